"""Plugin autoload: installing the package is enough for a fresh `import timm` to know halonet_*.

Everything here runs real child interpreters against real installs: the editable install the test suite
runs from (what CI and README do), and a wheel built from this checkout and installed into a fresh venv.
"""
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMES = [f'halonet_h{i}' for i in range(8)]

# A child that imports timm (not timm_halo) and reports what it sees; then what an explicit `import timm_halo`
# adds, and (REGISTER_AGAIN) whether registering a second time, by a reload and by the hook's loader, stays quiet.
PROBE = textwrap.dedent('''
    import json, sys, warnings
    warnings.simplefilter('always')
    with warnings.catch_warnings(record=True) as caught:
        import timm
        names = timm.list_models('halonet_h*')
        model = timm.create_model('halonet_h1', device='meta')
        stock = [type(m).__name__ for m in (timm.create_model('halonet26t', device='meta'),
                                            timm.models.byoanet.halonet_h1(device='meta'))]
        stock_attn = sorted({type(m).__name__ for m in timm.create_model('halonet26t', device='meta').modules()
                             if type(m).__name__.endswith('Attn')})
    import timm_halo
    if REGISTER_AGAIN:
        import importlib, _timm_halo_autoload
        warnings.simplefilter('error')
        importlib.reload(sys.modules['timm_halo.models.halonet'])
        _timm_halo_autoload.load_timm_plugins()
    print(json.dumps(dict(
        names=names,
        cls=type(model).__module__ + '.' + type(model).__name__,
        stock=stock,
        stock_attn=stock_attn,
        warnings=[str(w.message) for w in caught],
        timm_halo_file=timm_halo.__file__,
        names_after_import=timm.list_models('halonet_h*'),
        cls_after_import=type(timm.create_model('halonet_h1', device='meta')).__name__,
    )))
''')


def _child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ('TIMM_HALO_DISABLE_AUTOLOAD', 'TIMM_HALO_ACCELERATE')}
    env.update(extra)
    return env


def _probe(python: str, cwd: Path, register_again: bool = False, **env) -> dict:
    code = f'REGISTER_AGAIN = {register_again}\n{PROBE}'
    result = subprocess.run([python, '-c', code], capture_output=True, text=True, cwd=cwd, env=_child_env(**env),
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.heavy
def test_editable_install_autoloads_and_registering_twice_is_harmless(tmp_path):
    seen = _probe(sys.executable, tmp_path, register_again=True)
    assert seen['names'] == NAMES
    assert seen['cls'] == 'timm_halo.models.halonet.HaloNet'
    assert seen['stock'] == ['ByobNet', 'ByobNet']  # only halonet_h1 is replaced; timm's halo models stay timm's
    assert seen['stock_attn'] == ['HaloAttn']  # with timm's own layers too (TIMM_HALO_ACCELERATE: test_accelerate)
    assert seen['warnings'] == []  # no "Overwriting halonet_h1" noise either
    # a reload of the model module and a second plugin load (warnings are errors there) change nothing
    assert seen['names_after_import'] == NAMES and seen['cls_after_import'] == 'HaloNet'


def test_interpreter_start_up_imports_neither_torch_nor_timm(tmp_path):
    code = 'import sys; print(sorted(m for m in ("torch", "timm", "_timm_halo_autoload", "importlib.metadata") ' \
           'if m in sys.modules))'
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=tmp_path,
                            env=_child_env())
    assert result.returncode == 0, result.stderr
    assert eval(result.stdout) == ['_timm_halo_autoload']


@pytest.mark.heavy
def test_importing_timm_halo_first_is_quiet(tmp_path):
    """`import timm_halo` imports timm mid-way: the hook must not re-enter the half-imported package."""
    code = ('import warnings; warnings.simplefilter("error"); import timm_halo, timm; '
            'print(timm.list_models("halonet_h*"))')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=tmp_path,
                            env=_child_env())
    assert result.returncode == 0, result.stderr
    assert eval(result.stdout) == NAMES


@pytest.mark.heavy
def test_disable_switch_and_explicit_import(tmp_path):
    seen = _probe(sys.executable, tmp_path, TIMM_HALO_DISABLE_AUTOLOAD='1')
    assert seen['names'] == ['halonet_h1']  # timm's own untrained reference only
    assert seen['cls'] == 'timm.models.byobnet.ByobNet'
    assert seen['names_after_import'] == NAMES and seen['cls_after_import'] == 'HaloNet'  # `import timm_halo`


def test_installed_hook_is_this_checkout(tmp_path):
    """The start-up hook is a copy in site-packages, even for an editable install: it must match this checkout."""
    code = 'import _timm_halo_autoload as h; print(h.__file__)'
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=tmp_path,
                            env=_child_env())
    assert result.returncode == 0, result.stderr
    installed = Path(result.stdout.strip())
    assert installed.read_bytes() == (ROOT / '_timm_halo_autoload.py').read_bytes(), (
        f'{installed} is stale: re-run `pip install -e .` so that child interpreters run this checkout\'s hook')


# Around each sequence below: _COUNT_LOADS goes first (counts the hook's plugin loads), _REPORT last (what a
# plain `import timm` user then sees).
_REPORT = textwrap.dedent("""
    import timm
    print(json.dumps(dict(
        names=timm.list_models('halonet_h*'),
        cls=type(timm.create_model('halonet_h1', device='meta')).__module__,
        plugin_loads=len(_calls),
    )))
""")
_COUNT_LOADS = textwrap.dedent("""
    import json, sys
    import _timm_halo_autoload as _hook
    _calls, _load = [], _hook.load_timm_plugins
    def _counted():
        _calls.append(1)
        return _load()
    _hook.load_timm_plugins = _counted
""")


def _run_sequence(tmp_path, code: str) -> dict:
    """Run `code` in a fresh interpreter (start-up hook on), then report as `import timm` sees it."""
    result = subprocess.run([sys.executable, '-c', _COUNT_LOADS + textwrap.dedent(code) + _REPORT],
                            capture_output=True, text=True, cwd=tmp_path, env=_child_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_plugins_loaded_once(seen: dict):
    assert seen['names'] == NAMES
    assert seen['cls'] == 'timm_halo.models.halonet'  # not timm's own ByobNet halonet_h1
    assert seen['plugin_loads'] == 1


@pytest.mark.heavy
def test_find_spec_probes_before_import(tmp_path):
    """`importlib.util.find_spec('timm')` (the is-it-installed check of transformers & co.), twice, must not use up
    the hook; then `find_spec('timm.models')` imports the parent package timm.

    The probes see what they would without the hook, and their spec carries nothing of ours once timm is imported.
    """
    seen = _run_sequence(tmp_path, """
        import importlib.machinery, importlib.util
        spec, second = importlib.util.find_spec('timm'), importlib.util.find_spec('timm')
        plain = importlib.machinery.PathFinder.find_spec('timm')  # what the import system finds without us
        view = lambda s: (s.name, s.origin, s.submodule_search_locations, type(s.loader), s.cached, s.parent)
        assert view(spec) == view(plain), (view(spec), view(plain))
        assert spec == second
        assert 'timm' not in sys.modules
        assert importlib.util.find_spec('timm.models') is not None
        assert 'timm' in sys.modules  # find_spec of a submodule imports its parent: that is the real import
        import timm
        assert spec == timm.__spec__ == plain, 'the probe spec still differs from a plain one'
        assert 'exec_module' not in vars(spec.loader) and 'exec_module' not in vars(timm.__spec__.loader)
    """)
    _assert_plugins_loaded_once(seen)


@pytest.mark.heavy
def test_failed_import_then_retry(tmp_path):
    """A first `import timm` that raises (torch unimportable at that moment), then a retry that succeeds.

    Also: a reload afterwards neither crashes nor loads the plugins again.
    """
    seen = _run_sequence(tmp_path, """
        import importlib
        sys.modules['torch'] = None  # makes `import torch` raise ImportError
        try:
            import timm
        except ImportError:
            pass
        else:
            raise AssertionError('import timm should have failed without torch')
        del sys.modules['torch']
        for name in [m for m in sys.modules if m == 'timm' or m.startswith('timm.')]:
            del sys.modules[name]
        import timm
        importlib.reload(timm)
    """)
    _assert_plugins_loaded_once(seen)


@pytest.fixture(scope='module')
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh venv holding only our wheel; torch/timm come from this interpreter's site-packages by path.

    The stack is put on sys.path with a plain path line, which (unlike a site dir) does not run the .pth
    files there, so the editable install's own hook stays out of this venv.
    """
    tmp = tmp_path_factory.mktemp('wheel')
    wheel_dir = tmp / 'dist'
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
                    '-w', str(wheel_dir), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(wheel_dir.glob('timm_halo-*.whl'))
    env_dir = tmp / 'venv'
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / 'bin' / 'python'
    subprocess.run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '--no-deps', '--no-index',
                    '-q', str(wheel)], check=True, capture_output=True, timeout=300)
    site = Path(subprocess.run([str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                               check=True, capture_output=True, text=True).stdout.strip())
    assert (site / 'timm_halo_autoload.pth').exists() and (site / '_timm_halo_autoload.py').exists()
    (site / 'zz_host_stack.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    return python


@pytest.mark.heavy
def test_wheel_install_autoloads_and_a_broken_plugin_warns_once(wheel_venv, tmp_path):
    """The wheel's hook in a fresh venv, next to a second plugin whose module raises: `import timm` works and
    registers ours (the wheel's copy, not the checkout), and the one warning is the broken plugin's (so ours
    adds none)."""
    site = Path(subprocess.run([str(wheel_venv), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                               check=True, capture_output=True, text=True).stdout.strip())
    dist_info = site / 'broken_timm_plugin-1.0.dist-info'
    dist_info.mkdir()
    (dist_info / 'METADATA').write_text('Metadata-Version: 2.1\nName: broken-timm-plugin\nVersion: 1.0\n')
    (dist_info / 'entry_points.txt').write_text('[timm.plugins]\nbroken = broken_timm_plugin\n')
    (site / 'broken_timm_plugin.py').write_text('raise RuntimeError("plugin exploded on import")\n')
    try:
        seen = _probe(str(wheel_venv), tmp_path)
    finally:
        (site / 'broken_timm_plugin.py').unlink()
        for f in dist_info.iterdir():
            f.unlink()
        dist_info.rmdir()
    assert seen['names'] == NAMES
    assert seen['cls'] == 'timm_halo.models.halonet.HaloNet'
    assert seen['timm_halo_file'].startswith(str(wheel_venv.parents[1]))  # the wheel's copy, not the checkout
    assert len(seen['warnings']) == 1
    assert "'broken'" in seen['warnings'][0] and 'plugin exploded on import' in seen['warnings'][0]
