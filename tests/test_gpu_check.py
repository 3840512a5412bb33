"""benchmarks/gpu_check.sh's CPU dry run: every section writes its table, and a failing section (an exception, a
crash, a hang) is recorded with its error while the others are still written.

No GPU, no network: ``--device cpu --quick`` with this interpreter (the script's PYTHON), tables in a temp $OUT.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'benchmarks' / 'gpu_check.sh'
SECTIONS = ('tests', 'layer', 'sdpa', 'models_eager', 'models_compiled')

pytestmark = [
    pytest.mark.heavy,
    pytest.mark.skipif(not SCRIPT.is_file(), reason='benchmarks/ is only in a source checkout'),
    pytest.mark.skipif(sys.platform != 'linux' or not shutil.which('timeout'),
                       reason="the GPU check is a Linux script (bash 4, coreutils' timeout)"),
]


def dry_run(out: Path, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith('GPU_CHECK_')}
    environ.update(OUT=str(out), PYTHON=sys.executable, **env)
    return subprocess.run(['bash', str(SCRIPT), '--device', 'cpu', '--quick'], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=600)


def section(out: Path, name: str) -> dict:
    for ext in ('md', 'json', 'log'):
        assert (out / f'{name}.{ext}').stat().st_size > 0, f'{name}.{ext} is empty'
    data = json.loads((out / f'{name}.json').read_text())
    data['md'] = (out / f'{name}.md').read_text()
    return data


def test_dry_run_writes_every_section(tmp_path):
    result = dry_run(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in SECTIONS:
        data = section(tmp_path, name)
        assert data['status'] == 'ok', (name, data.get('error'))
        assert data['rows'], name
        assert data['md'].startswith('## ') and '| ' in data['md'], name
        assert f'  {name}: ok' in result.stdout  # the closing per-section status
    models = section(tmp_path, 'models_eager')['rows']
    assert {r['model'] for r in models} == {'ours halonet_h1', 'timm halonet_h1', 'resnet50'}
    assert all(r['ms'] is not None and r['note'] == 'first call (quick)' for r in models), models
    summary = (tmp_path / 'gpu.md').read_text()
    for name in SECTIONS:
        assert section(tmp_path, name)['title'] in summary
    assert '## Performance goals' in summary
    assert set(json.loads((tmp_path / 'gpu.json').read_text())['sections']) == set(SECTIONS)


def test_a_section_forced_to_fail_is_recorded_and_the_rest_is_written(tmp_path):
    result = dry_run(tmp_path, GPU_CHECK_FAIL='layer')
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    layer = section(tmp_path, 'layer')
    assert layer['status'] == 'failed'
    assert 'RuntimeError: forced failure of section layer (GPU_CHECK_FAIL)' in layer['error']
    assert 'FAILED' in layer['md'] and 'Traceback' in layer['md']
    assert len(layer['rows']) == 1  # the row written before the failure is kept
    for name in set(SECTIONS) - {'layer'}:
        data = section(tmp_path, name)
        assert data['status'] == 'ok' and data['rows'], (name, data.get('error'))
    assert 'layer: failed' in result.stdout
    assert '| layer | failed |' in (tmp_path / 'gpu.md').read_text()


def test_a_crash_a_hang_and_a_failing_pytest_are_recorded(tmp_path):
    """What a poisoned CUDA context (a signal) or a stuck compile (the section's time limit) look like."""
    result = dry_run(tmp_path, GPU_CHECK_SECTIONS='tests,sdpa,layer', GPU_CHECK_FAIL='tests,sdpa:hang,layer:crash',
                     GPU_CHECK_LIMITS='sdpa=20')
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    tests, sdpa, layer = (section(tmp_path, name) for name in ('tests', 'sdpa', 'layer'))
    assert tests['status'] == 'failed' and 'forced failure of section tests' in tests['error']
    assert sdpa['status'] == 'failed' and sdpa['error'].startswith('timed out after 20 s')
    assert layer['status'] == 'failed' and layer['error'] == 'killed by SIGSEGV'
    assert len(layer['rows']) == 1 and 'FAILED' in layer['md']
    assert not (tmp_path / 'models_eager.json').exists()  # not among GPU_CHECK_SECTIONS
    summary = (tmp_path / 'gpu.md').read_text()
    assert '| sdpa | failed |' in summary and '| layer | failed |' in summary
