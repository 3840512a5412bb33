"""README and docs/ stay true: their Python snippets run, README's family table is the code's, README opens with
the two commands CI runs, links resolve, and the pages speak of the project, not of how it was made."""
import re
from pathlib import Path

import pytest

from timm_halo.models.halonet import FAMILY

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()
PAGES = [ROOT / 'README.md', ROOT / 'CHANGELOG.md', *sorted((ROOT / 'docs').glob('*.md'))]
# README's first lines, in this order: what a newcomer runs on a fresh machine (the main job; the tests)
FIRST_COMMANDS = ('pip install . && timm-halo', 'pip install -e ".[dev]" && python -m pytest -q')
# A snippet that cannot run offline (it needs a Hub repo, a GPU, ...) says so on the line above its fence.
NOT_RUN = '<!-- not run'


def _snippets():
    """(page, index, code) of every ```python block of README.md and docs/*.md that is meant to run."""
    found = []
    for page in [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]:
        text = page.read_text()
        for index, match in enumerate(re.finditer(r'```python\n(.*?)```', text, re.S)):
            before = text[:match.start()].rstrip('\n').rsplit('\n', 1)[-1]
            if not before.startswith(NOT_RUN):
                found.append(pytest.param(page, match.group(1), id=f'{page.relative_to(ROOT)}-{index}'))
    return found


SNIPPETS = _snippets()


def test_readme_and_docs_have_snippets():
    pages = {param.values[0].name for param in SNIPPETS}
    assert 'README.md' in pages and len(pages) >= 3, pages


@pytest.mark.heavy
@pytest.mark.parametrize('page, code', SNIPPETS)
def test_python_snippet_runs(page, code):
    exec(compile(code, str(page), 'exec'), {'__name__': '__snippet__'})


def test_readme_opens_with_the_two_commands():
    lines = README.splitlines()
    assert lines[0].startswith('# ') and lines[1] == '' and lines[2] == '```bash' and lines[5] == '```', lines[:6]
    commands = [line.split('#')[0].strip() for line in lines[3:5]]
    assert tuple(commands) == FIRST_COMMANDS


def test_readme_is_a_first_page():
    assert len(README.splitlines()) <= 180
    linked = set(re.findall(r'\]\((docs/[\w.-]+\.md)', README))
    assert linked == {f'docs/{p.name}' for p in (ROOT / 'docs').glob('*.md')}, 'README links every docs page'


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def test_links_resolve():
    bad = []
    for page in PAGES:
        for target in re.findall(r'\]\(([^)\s]+)\)', page.read_text()):
            if re.match(r'[a-z]+:', target):
                continue  # a web address
            path, _, anchor = target.partition('#')
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f'{page.name}: {target} (no such file)')
            elif anchor and dest.suffix == '.md':
                anchors = {_slug(h) for h in re.findall(r'^#+ (.*)$', dest.read_text(), re.M)}
                if anchor not in anchors:
                    bad.append(f'{page.name}: {target} (no such heading)')
    assert not bad, bad


def test_pages_speak_of_the_project_not_of_its_making():
    pages = [*PAGES, ROOT / 'benchmarks' / 'RESULTS.md']
    words = re.compile(r'\b(tasks?|issues?|sessions?)\b', re.I)
    hits = [f'{page.relative_to(ROOT)}:{n}: {line.strip()}' for page in pages
            for n, line in enumerate(page.read_text().splitlines(), 1) if words.search(line)]
    assert not hits, hits


def test_family_table_is_the_code_table(family_summary):
    """Every number of README's family table: the paper's settings and figures from halonet.FAMILY, params
    (measured) and GMACs as `timm-halo` prints them."""
    start = README.index('## The family')
    section = README[start:README.index('\n## ', start)]
    rows = re.findall(r'^\| (halonet_h\d) \|(.*)\|$', section, re.M)
    assert [name for name, _ in rows] == list(FAMILY)
    for name, cells in rows:
        b, h, rv, rb, l3, df, size, params, paper, gmacs, top1 = (c.strip() for c in cells.split('|'))
        f, measured = FAMILY[name], family_summary[name]
        assert (int(b), int(h), float(rv), float(rb), int(l3), int(size)) == (
            f['b'], f['h'], f['rv'], f['rb'], f['l3'], f['s']), name
        assert (0 if df == '–' else int(df)) == f['df'], name
        assert (paper, float(top1)) == (f"{f['params_m']}M", f['top1']), name
        assert (params, gmacs) == (f"{measured['params_m']:.2f}M", f"{measured['gmacs']:.2f}"), name


def test_ci_runs_the_readme_test_command():
    ci_run = ROOT / '.ci' / 'run'
    if not ci_run.is_file():
        pytest.skip('.ci/run is not part of this copy')
    install, test = [part.strip() for part in FIRST_COMMANDS[1].split('&&')]
    ci = ci_run.read_text()
    assert f'python -m {install}' in ci or install in ci
    assert test in ci.splitlines()
