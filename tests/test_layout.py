"""The house plan: the core (the layer and the model family) imports no tooling, and no module imports itself back
through others (checked on the source, every import statement, top-level or inside functions)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / 'timm_halo'
CORE = ('timm_halo.layers', 'timm_halo.models')
TOOLING = ('timm_halo.hub', 'timm_halo.export', 'timm_halo.bench', 'timm_halo.cli', 'timm_halo.__main__')


def _modules():
    for path in sorted(PACKAGE.rglob('*.py')):
        parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
        yield ('.'.join(parts[:-1]) if parts[-1] == '__init__' else '.'.join(parts)), path


def _imports(name: str, path: Path, known: set) -> set:
    """The package's modules that ``name`` imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parent = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(parent + ([base] if base else []))
            found |= {f'{base}.{alias.name}' if f'{base}.{alias.name}' in known else base for alias in node.names}
    return {m for m in found if m in known and m != name}


def _graph() -> dict:
    modules = dict(_modules())
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_core_imports_no_tooling():
    for name, imported in _graph().items():
        if name.startswith(CORE):
            assert not {m for m in imported if m.startswith(TOOLING)}, name


def test_no_import_cycles():
    graph, done, path = _graph(), set(), []

    def visit(name):
        assert name not in path, 'import cycle: ' + ' -> '.join(path[path.index(name):] + [name])
        if name in done:
            return
        path.append(name)
        for other in sorted(graph[name]):
            visit(other)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
