"""Benchmark plumbing: `timm-halo bench`, the interleaved timing loop, GMAC counts, ratios and plots.

Nothing here asserts on a measured time: the machines running the suite are shared and noisy.
"""
import argparse
import json
import os
import re
import subprocess
import sys
from functools import partial

import pytest
import timm
import torch

import timm_halo.bench as bench
from timm_halo.bench import ModelResult, ModelSpec, measure_models, model_gmacs, summarize, timm_spec
from timm_halo.cli import main as cli_main

CPU = torch.device('cpu')


def _tiny_h0():
    return timm.create_model('halonet_h0', depths=(1, 1, 1, 1), widths=(16, 32, 64, 64), num_classes=10)


def test_bench_command_prints_table_with_img_per_s_and_gmacs(capsys):
    assert cli_main(['bench', '--model', 'halonet_h0', '--img-size', '64', '--batch-size', '1', '--repeats', '1']) == 0
    out = capsys.readouterr().out
    header = '| model | input | batch | mode | ms/step | img/s | GMACs/img | GMAC/s |'
    assert header in out
    number = r' \| ([\d.]+)'
    row = re.search(r'^\| halonet_h0 \| 64 \| 1 \| infer' + number * 4 + r' \|$', out, re.M)
    assert row, out
    ms, img_per_s, gmacs = (float(row.group(i)) for i in (1, 2, 3))
    assert ms > 0 and img_per_s > 0
    assert gmacs == pytest.approx(summarize('halonet_h0', 64)['gmacs'], abs=0.005)  # the table rounds to 2 places
    assert '| train |' not in out  # the train step is opt-in (--train)


def test_bench_command_rejects_unknown_model_and_fp16_on_cpu(capsys):
    for argv, message in ((['bench', '--model', 'halonet_h9'], "unknown model 'halonet_h9'"),
                          (['bench', '--device', 'cpu', '--amp', 'fp16'], '--amp fp16 is only supported on CUDA')):
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_options_before_the_command_are_honoured_or_refused(capsys, tmp_path):
    """`timm-halo --model halonet_h0 --img-size 64 bench` benchmarks halonet_h0 at 64 (not the command's
    defaults); an option the command does not take is an error, not ignored."""
    out = tmp_path / 'bench.json'
    assert cli_main(['--model', 'halonet_h0', '--img-size', '64', '--batch-size', '1', 'bench', '--repeats', '1',
                     '--warmup', '0', '--json', str(out)]) == 0
    assert '| halonet_h0 | 64 | 1 | infer |' in capsys.readouterr().out
    (row,) = json.loads(out.read_text())['rows']
    assert (row['label'], row['img_size'], row['batch_size']) == ('halonet_h0', 64, 1)
    with pytest.raises(SystemExit) as e:
        cli_main(['--skip-family', 'bench'])
    assert e.value.code == 2 and '--skip-family does not apply to bench' in capsys.readouterr().err


class _FakeClock:
    """perf_counter stand-in: time moves only when a contender runs, by the amount it says."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_interleaved_medians_calls_every_contender_round_robin():
    clock = _FakeClock()
    calls = []
    durations = {'a': iter([9, 9, 1, 5, 3]), 'b': iter([9, 9, 2, 2, 20]), 'c': iter([9, 9, 7, 7, 7])}

    def contender(name):
        calls.append(name)
        clock.now += next(durations[name])

    fns = {name: partial(contender, name) for name in 'abc'}
    medians = bench.interleaved_medians(fns, repeats=3, warmup=2, timer=clock)
    assert calls == list('abc') * 5  # 2 warm-up rounds + 3 timed rounds, one call per contender per round
    assert medians == {'a': 3, 'b': 2, 'c': 7}  # warm-up durations (9) never count


def test_table_formats_cells_and_shows_missing_values_as_a_dash():
    rows = [dict(name='a|b', ms=1.234, ok=True), dict(name='c', ms=None, ok=False)]
    columns = ['name', ('ms', 'ms', '{:.1f}'), ('met', 'ok', lambda v: 'yes' if v else 'NO')]
    assert bench.table(columns, rows).splitlines() == [
        '| name | ms | met |', '|---|---|---|', '| a/b | 1.2 | yes |', '| c | - | NO |']


def test_measure_modes_times_each_mode_with_the_run_options():
    args = argparse.Namespace(load=0, warmup=0, compile=False, channels_last=False, device=CPU, amp_dtype=None,
                              batch_size=2, repeats=1)
    results = bench.measure_modes([ModelSpec('tiny', _tiny_h0, 64)], args, (False, True))
    assert [(r.label, r.mode, r.batch_size) for r in results] == [('tiny', 'infer', 2), ('tiny', 'train', 2)]


def test_benchmarks_is_not_importable_outside_the_checkout(tmp_path):
    """The editable install exposes timm_halo only, not the checkout's top-level benchmarks/ or tests/."""
    code = 'import importlib.util as u; print(u.find_spec("benchmarks"), u.find_spec("timm_halo") is not None)'
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.split() == ['None', 'True'], result.stdout + result.stderr


def test_gmacs_match_summarize(family_summary):
    spec = timm_spec('halonet_h1')
    assert spec.img_size == 256  # the model's own input size
    assert model_gmacs(spec.factory, spec.img_size) == pytest.approx(family_summary['halonet_h1']['gmacs'], rel=1e-9)
    assert model_gmacs(partial(timm.create_model, 'halonet_h0'), 64) == pytest.approx(
        summarize('halonet_h0', 64)['gmacs'], rel=1e-9)


def test_measure_models_infer_and_train_step():
    specs = [ModelSpec('tiny', _tiny_h0, 64), ModelSpec('tiny', _tiny_h0, 48)]
    infer = measure_models(specs, CPU, batch_size=2, repeats=1, warmup=0)
    train = measure_models(specs[:1], CPU, batch_size=2, train=True, repeats=1, warmup=0, amp_dtype=torch.bfloat16,
                           channels_last=True)
    assert [(r.img_size, r.mode) for r in infer + train] == [(64, 'infer'), (48, 'infer'), (64, 'train')]
    for r, size in zip(infer + train, (64, 48, 64)):
        assert r.seconds > 0 and r.gmacs == pytest.approx(model_gmacs(_tiny_h0, size), rel=1e-9)
    # the derived figures, on numbers worked out by hand: 2 images in 0.5 s, 3 GMACs per forward
    step = ModelResult('x', 64, 2, True, 0.5, 3.0)
    assert (step.img_per_s, step.gmac_per_s) == (4.0, 36.0)  # fwd+bwd = three forwards: 9 GMACs an image
    assert vars(step)['mode'] == 'train' and ModelResult('x', 64, 2, False, 0.5, 3.0).gmac_per_s == 12.0
    with pytest.raises(ValueError, match='duplicate'):
        measure_models([specs[0], specs[0]], CPU, batch_size=1, repeats=1, warmup=0)


def _result(label, size, seconds, gmacs, train=False):
    return ModelResult(label, size, 2, train, seconds, gmacs)


def test_model_benchmark_ratios():
    model_bench = pytest.importorskip('benchmarks.model', reason='benchmarks/ is only in a source checkout')
    results = [_result(model_bench.OURS, 256, 1.0, 3.0), _result('timm halonet_h1', 256, 2.0, 3.0),
               _result('resnet50', 224, 0.5, 4.0)]
    rows = {r['peer']: r for r in model_bench.ratios(results)}
    assert set(rows) == {'timm halonet_h1 @256', 'resnet50 @224'}
    assert rows['timm halonet_h1 @256']['speed'] == pytest.approx(2.0)
    assert rows['resnet50 @224']['speed'] == pytest.approx(0.5)
    # ours: 3 GMACs x 2 img/s = 6 GMAC/s; resnet50: 4 x 4 = 16 GMAC/s
    assert rows['resnet50 @224']['gmac_per_s_pct'] == pytest.approx(37.5)


def test_resolution_deviation_from_linear():
    resolution = pytest.importorskip('benchmarks.resolution', reason='benchmarks/ is only in a source checkout')
    # 512 px: 4x the pixels; 4x the time is linear (0%), 5x is +25%
    rows = resolution.rows_for([_result('m', 256, 1.0, 2.0), _result('m', 512, 4.0, 8.0),
                                _result('m', 768, 9.0 * 1.25, 18.0)])
    assert [round(r['time_deviation_pct'], 6) for r in rows] == [0.0, 0.0, 25.0]
    assert [round(r['gmacs_deviation_pct'], 6) for r in rows] == [0.0, 0.0, 0.0]
    assert [r['within_target'] for r in rows] == [True, True, False]
    assert rows[1]['ms_per_img'] == pytest.approx(2000.0)  # 4 s per batch of 2


def test_lucidrains_peer_is_nchw_with_equal_dims():
    pytest.importorskip('halonet_pytorch')
    layer_bench = pytest.importorskip('benchmarks.layer', reason='benchmarks/ is only in a source checkout')
    x = torch.randn(1, 64, 16, 16)
    ours = layer_bench.make_layer('timm_halo', 64, CPU)
    peer = layer_bench.make_layer('lucidrains', 64, CPU)
    assert peer(x).shape == ours(x).shape == x.shape
    # Same q/k/v widths; the peer adds its CxC output projection (weight + bias) on top.
    qkv = sum(p.numel() for n, p in ours.named_parameters() if not n.startswith('rel_pos'))
    peer_qkv = sum(p.numel() for n, p in peer.named_parameters() if n.startswith(('to_q', 'to_kv')))
    assert peer_qkv == qkv


@pytest.mark.parametrize('kind', ['layer', 'model', 'resolution'])
def test_plot_writes_png(tmp_path, kind):
    pytest.importorskip('matplotlib')
    plot_mod = pytest.importorskip('benchmarks.plot', reason='benchmarks/ is only in a source checkout')
    if kind == 'layer':
        rows = [dict(shape=s, impl=i, fwd_ms=1.0, fwd_bwd_ms=2.0, peak_mb=3.0)
                for s in ('stage1', 'stage3') for i in ('timm', 'timm_halo')]
    elif kind == 'model':
        rows = [dict(vars(_result(lb, 256, 1.0, 3.0, train))) for lb in ('a', 'b') for train in (False, True)]
    else:
        resolution = pytest.importorskip('benchmarks.resolution')
        rows = resolution.rows_for([_result('m', 256, 1.0, 2.0), _result('m', 512, 4.4, 8.0)])
    path = tmp_path / f'{kind}.png'
    plot_mod.plot(dict(benchmark=kind, header='test', rows=rows), str(path))
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.heavy  # exports three (tiny) models to ONNX
def test_deploy_benchmark_quick_table_ratios_and_ort_profile(tmp_path, monkeypatch, capsys):
    pytest.importorskip('onnxruntime')
    deploy = pytest.importorskip('benchmarks.deploy', reason='benchmarks/ is only in a source checkout')
    # Tiny stand-ins at 64 px (timm's halonet_h1 needs 256 px; exporting the real three takes over a minute).
    monkeypatch.setattr(deploy, 'CONTENDERS', {deploy.OURS: _tiny_h0, deploy.TIMM: _tiny_h0,
                                               deploy.RESNET: partial(timm.create_model, 'resnet10t', num_classes=10)})
    out = tmp_path / 'deploy.json'
    deploy.main(['--quick', '--img-size', '64', '--ort-profile', '1', '--json', str(out)])
    assert '| backend | malloc | model | ms | img/s | GMAC/s |' in capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = {(r['backend'], r['malloc'], r['model']): r for r in data['rows']}
    timed = (('eager', 'default'), ('eager', 'tuned'), ('ort', 'default'))
    assert set(rows) == {(b, malloc, m) for b, malloc in timed for m in deploy.CONTENDERS}
    assert all(r['batch'] == 1 and r['ms'] > 0 and r['gmac_per_s'] > 0 for r in rows.values())
    assert rows[('eager', 'tuned', deploy.RESNET)]['vs_resnet50'] == pytest.approx(1.0)
    ours_ort = rows[('ort', 'default', deploy.OURS)]
    assert ours_ort['ms_vs_eager'] == pytest.approx(ours_ort['ms'] / rows[('eager', 'default', deploy.OURS)]['ms'])
    assert all(v['max_abs_diff'] < 1e-4 for v in data['onnx'].values())  # the timed graphs compute the model
    assert [(t['malloc'], t['value'] is not None) for t in data['targets']] == [('default', True)] * 4 + [
        ('tuned', True)] * 4
    tuned_goal = data['targets'][7]['value']  # ours in ORT against ours eager under the tuned malloc
    assert tuned_goal == pytest.approx(ours_ort['seconds'] / rows[('eager', 'tuned', deploy.OURS)]['seconds'])
    assert data['ort_profile']['op_types'] and data['ort_profile']['node_ms'] > 0


def test_deploy_ratios_on_numbers_worked_out_by_hand():
    deploy = pytest.importorskip('benchmarks.deploy', reason='benchmarks/ is only in a source checkout')
    rows = [dict(backend=b, malloc=malloc, model=m, batch=1, seconds=s, gmacs=g, gmac_per_s=g / s)
            for b, malloc, m, s, g in (
                ('eager', 'default', deploy.OURS, 0.1, 3.0), ('eager', 'default', deploy.TIMM, 0.3, 3.0),
                ('eager', 'default', deploy.RESNET, 0.05, 5.0), ('ort', 'default', deploy.OURS, 0.2, 3.0),
                ('eager', 'tuned', deploy.OURS, 0.08, 3.0), ('eager', 'tuned', deploy.TIMM, 0.16, 3.0))]
    by = {(r['backend'], r['malloc'], r['model']): r for r in deploy.add_ratios(rows)}
    ours = by[('eager', 'default', deploy.OURS)]
    assert ours['vs_timm'] == pytest.approx(3.0) and ours['vs_resnet50'] == pytest.approx(0.5)
    assert ours['gmac_per_s_pct_resnet50'] == pytest.approx(30.0)  # 30 GMAC/s against 100
    assert by[('ort', 'default', deploy.OURS)]['ms_vs_eager'] == pytest.approx(2.0)
    assert by[('ort', 'default', deploy.OURS)]['vs_timm'] is None  # no timm row in ORT: no wrong ratio
    tuned = by[('eager', 'tuned', deploy.OURS)]  # peers from the same malloc setting only
    assert tuned['vs_timm'] == pytest.approx(2.0) and tuned['vs_resnet50'] is None
    goals = {(t['target'], t['malloc']): t['value'] for t in deploy.target_rows(rows)}
    assert goals[deploy.TARGETS[0], 'tuned'] == pytest.approx(2.0)
    assert goals[deploy.TARGETS[3], 'tuned'] == pytest.approx(2.5)  # ORT 0.2 s against eager 0.08 s
    assert goals[deploy.TARGETS[1], 'tuned'] is None and goals[deploy.TARGETS[3], 'default'] == pytest.approx(2.0)


def test_deploy_worker_process_sees_the_malloc_setting(monkeypatch):
    deploy = pytest.importorskip('benchmarks.deploy', reason='benchmarks/ is only in a source checkout')
    key, value = next(iter(bench.TUNED_MALLOC.items()))
    monkeypatch.setenv(key, '12345')  # the parent's own setting: removed for the default run, restored after
    with deploy._worker(bench.TUNED_MALLOC) as tuned, deploy._worker(dict.fromkeys(bench.TUNED_MALLOC)) as plain:
        assert os.environ[key] == '12345'
        assert tuned.apply(os.getenv, (key,)) == value and plain.apply(os.getenv, (key,)) is None
