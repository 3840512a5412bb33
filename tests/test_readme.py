"""README stays true: its Python snippets run, its family table is the code's, and CI runs its test command."""
import re
from pathlib import Path

import pytest

from timm_halo.models.halonet import FAMILY

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()


@pytest.mark.heavy
def test_python_snippets_run():
    blocks = re.findall(r'```python\n(.*?)```', README, re.S)
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, 'README.md', 'exec'), {})


def test_family_table_is_the_code_table(family_summary):
    """Every number of README's family table: the paper's settings and figures from halonet.FAMILY, params
    (measured) and GMACs as `timm-halo` prints them."""
    section = README[README.index('## The family'):README.index('## Publishing')]
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
    first_block = re.search(r'```bash\n(.*?)```', README, re.S).group(1).splitlines()
    install_and_test = first_block[1].split('#')[0].strip()
    install, test = [part.strip() for part in install_and_test.split('&&')]
    ci = ci_run.read_text()
    assert f'python -m {install}' in ci or install in ci
    assert test in ci.splitlines()
