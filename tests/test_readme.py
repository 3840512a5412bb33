"""README stays true: its Python snippets run, and CI runs exactly its test command."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()


def test_python_snippets_run():
    blocks = re.findall(r'```python\n(.*?)```', README, re.S)
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, 'README.md', 'exec'), {})


def test_ci_runs_the_readme_test_command():
    first_block = re.search(r'```bash\n(.*?)```', README, re.S).group(1).splitlines()
    install_and_test = first_block[1].split('#')[0].strip()
    install, test = [part.strip() for part in install_and_test.split('&&')]
    ci = (ROOT / '.ci' / 'run').read_text()
    assert f'python -m {install}' in ci or install in ci
    assert test in ci.splitlines()
