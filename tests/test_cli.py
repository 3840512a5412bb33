"""The `timm-halo` main job, run the way README runs it."""
import re
import shutil
import subprocess
import sys

import pytest

from timm_halo.models import PAPER_PARAMS_M


def test_default_command_shows_family_and_runs_a_forward():
    result = subprocess.run([sys.executable, '-m', 'timm_halo'], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name, paper in PAPER_PARAMS_M.items():
        row = re.search(rf'^{name}\s+(\d+)\s+([\d.]+)M\s+([\d.]+)M\s+([+-][\d.]+)%\s+([\d.]+)', out, re.M)
        assert row, f'no table row for {name}'
        assert abs(float(row.group(2)) / paper - 1) < 0.03
        assert float(row.group(5)) > 0
    assert "timm.create_model('halonet_h0') -> timm_halo.models.halonet.HaloNet" in out
    assert 'logits (1, 1000)' in out
    assert re.search(r'stages\.3\s+reduction 32\s+\(1, 256, 8, 8\)', out)
    diff = float(re.search(r'max \|diff\| ([\d.e+-]+)', out).group(1))
    assert diff < 1e-4
    assert 'measuring the family' in result.stderr  # the progress bar


@pytest.mark.skipif(shutil.which('timm-halo') is None, reason='console script not installed')
def test_console_script_rejects_unknown_model():
    result = subprocess.run(['timm-halo', '--model', 'halonet_h9', '--skip-family'], capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown model 'halonet_h9'" in result.stderr
