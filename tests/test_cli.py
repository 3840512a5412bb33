"""The `timm-halo` main job, run the way README runs it; the command's entry points and its one-line errors."""
import json
import re
import runpy
import sys
from importlib.metadata import entry_points

import pytest
import timm
from safetensors.torch import save_file

from timm_halo import bench
from timm_halo.cli import main
from timm_halo.models.halonet import FAMILY


def test_default_command_shows_family_and_runs_a_forward(family_summary, monkeypatch, capsys):
    """`python -m timm_halo` with no arguments, run the way `python -m` runs it (runpy, in this process: nothing
    here needs a fresh interpreter). The family's rows are ``bench.summarize`` of each member, which the session
    has measured already (conftest.family_summary), so the command is handed those instead of measuring again."""
    asked = []
    monkeypatch.setattr(bench, 'summarize', lambda name: asked.append(name) or family_summary[name])
    monkeypatch.setattr(sys, 'argv', ['timm_halo'])
    with pytest.raises(SystemExit) as info:
        runpy.run_module('timm_halo', run_name='__main__', alter_sys=True)
    captured = capsys.readouterr()
    assert info.value.code == 0, captured.err
    assert asked == list(FAMILY)
    out = captured.out
    for name, f in FAMILY.items():
        row = re.search(rf'^{name}\s+(\d+)\s+([\d.]+)M\s+([\d.]+)M\s+([+-][\d.]+)%\s+([\d.]+)', out, re.M)
        assert row, f'no table row for {name}'
        measured = family_summary[name]
        assert (int(row.group(1)), row.group(2), row.group(5)) == (
            f['s'], f"{measured['params_m']:.2f}", f"{measured['gmacs']:.2f}"), name
        assert float(row.group(5)) > 0
    assert "timm.create_model('halonet_h0') -> timm_halo.models.halonet.HaloNet" in out
    assert 'logits (1, 1000)' in out
    assert re.search(r'stages\.3\s+reduction 32\s+\(1, 256, 8, 8\)', out)
    diff = float(re.search(r'max \|diff\| ([\d.e+-]+)', out).group(1))
    assert diff < 1e-4
    assert 'measuring the family' in captured.err  # the progress bar


def test_console_script_is_the_cli_main():
    """`timm-halo` (README's command) is an installed console script calling timm_halo.cli:main, the function
    the other tests drive in-process (test_default_command... runs it through `python -m`'s runpy)."""
    (script,) = entry_points(group='console_scripts', name='timm-halo')
    assert script.value == 'timm_halo.cli:main' and script.load() is main


def test_unknown_model_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(['--model', 'halonet_h9', '--skip-family'])
    assert info.value.code == 2
    assert "unknown model 'halonet_h9'" in capsys.readouterr().err


def test_hub_errors_are_one_line_with_exit_codes(tmp_path, capsys):
    """Bad input to hub-export / hub-inspect: one line on stderr, exit 1 (failure) or 2 (bad argument)."""
    model = timm.create_model('halonet_h1', depths=[1, 1, 1, 1], widths=[16, 32, 64, 64], stem_chs=16)
    folder = tmp_path / 'folder'
    timm.models.save_for_hf(model, str(folder), safe_serialization=True)
    config = json.loads((folder / 'config.json').read_text())
    config['architecture'] = 'resnet18'
    (folder / 'config.json').write_text(json.dumps(config))
    save_file(model.state_dict(), str(tmp_path / 'model.safetensors'))

    runs = [
        (['hub-inspect', str(folder)], 1, "names architecture 'resnet18'"),
        (['hub-export', '--model', 'resnet18', '--checkpoint', str(tmp_path / 'model.safetensors'),
          '--output', str(tmp_path / 'out')], 2, "unknown model 'resnet18'"),
        # no --model, and a safetensors file names none (a train.py checkpoint would: its args.model)
        (['hub-export', '--checkpoint', str(tmp_path / 'model.safetensors'), '--output', str(tmp_path / 'out')], 1,
         "No model name given, and the checkpoint's training args name none (args.model); give it (--model"),
    ]
    for argv, code, expected in runs:
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert rc == code, err
        assert expected in err
        errors = [line for line in err.splitlines() if 'error:' in line]
        assert len(errors) == 1 and errors[0].startswith(f'timm-halo {argv[0]}: error: ')


def test_export_to_an_unwritable_output_is_one_line(tmp_path, capsys):
    blocker = tmp_path / 'a-file'
    blocker.write_text('')
    assert main(['export', '--model', 'halonet_h0', '--img-size', '32', '--output', str(blocker / 'x.onnx')]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f'timm-halo export: error: cannot write --output {blocker / "x.onnx"}: ')
    assert err.count('\n') == 1
