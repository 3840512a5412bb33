"""Deployment: ONNX (run in ONNX Runtime) and torch.export, held to eager PyTorch; the `timm-halo export` command.

The whole family at full size is covered by tests marked `slow` (python -m pytest -q -m slow).
"""
import contextlib
import io
import re
from pathlib import Path

import onnxruntime as ort
import pytest
import timm
import torch

import timm_halo  # noqa: F401  (registers the halonet_* models with timm)
from timm_halo import HaloAttention
from timm_halo import export as ex
from timm_halo.cli import main

# older torch: tests/test_contracts.py::test_export_needs_a_recent_torch
pytestmark = pytest.mark.skipif(torch.__version__ < ex.EXPORT_MIN_TORCH, reason='export needs a newer torch')

NAMES = [f'halonet_h{i}' for i in range(8)]


def _reduced(name: str, stages: int = 2, **kwargs) -> torch.nn.Module:
    """The variant's block design (b, h, rv, rb, df) with one block in each of its first ``stages`` stages; every
    residual branch live. Two stages hold what the last two would add: a stride-1 and a strided attention, on maps
    of several (padded) blocks and on maps smaller than one block, and the final conv (df)."""
    torch.manual_seed(0)
    model = timm.create_model(name, depths=(1,) * stages, widths=(64, 128, 256, 512)[:stages], **kwargs)
    return ex.wake_residual_branches(model).eval()


def _full(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return ex.wake_residual_branches(timm.create_model(name)).eval()


def _ort_vs_eager(path, model: torch.nn.Module, x: torch.Tensor) -> float:
    """Independent of timm_halo.export: a fresh ONNX Runtime session against the eager model."""
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    (got,) = session.run(None, {'input': x.numpy()})
    with torch.no_grad():
        expected = model(x)
    assert got.shape == tuple(expected.shape)
    return (torch.from_numpy(got) - expected).abs().max().item()


# -- HaloAttention alone ------------------------------------------------------------------------------------------

LAYERS = {
    'stride1-proj': dict(dim=16, block_size=4, halo_size=1, heads=2, dim_head=8, dim_out=12),
    'stride2-halo>block': dict(dim=16, block_size=2, halo_size=3, heads=2, dim_head=4, stride=2, value_ratio=2.0),
}


@pytest.mark.heavy
@pytest.mark.parametrize('cfg', LAYERS.values(), ids=LAYERS.keys())
def test_layer_onnx_dynamic_batch_and_size(tmp_path, cfg):
    torch.manual_seed(0)
    layer = HaloAttention(**cfg).eval()
    example = ex.example_input(layer, batch_size=2)  # 2b + 3: not a multiple of the block
    report = ex.export_onnx_checked(layer, tmp_path / 'attn.onnx', example, dynamic_batch=True, dynamic_size=True)
    assert report.ok and len(report.input_shapes) == 3

    session = ort.InferenceSession(str(tmp_path / 'attn.onnx'), providers=['CPUExecutionProvider'])
    assert session.get_inputs()[0].shape == ['batch', 16, 'height', 'width']
    # sizes whose block counts, padding and border masks all differ from the example's
    for shape in [(1, 16, 1, 1), (3, 16, 1, 9), (1, 16, 8, 8), (2, 16, 17, 6), (1, 16, 30, 31)]:
        x = torch.randn(*shape)
        (got,) = session.run(None, {'input': x.numpy()})
        ref = layer.reference_forward(x).detach()  # the dense reference, not the path that was exported
        assert got.shape == tuple(ref.shape), shape
        assert (torch.from_numpy(got) - ref).abs().max().item() <= ex.ONNX_ATOL, shape


@pytest.fixture(scope='module')
def static_layer(tmp_path_factory):
    """A layer exported for its example's shape alone (no dynamic axis), and the file. (A static size with a
    dynamic batch: test_reduced_model_onnx_dynamic_batch.)"""
    torch.manual_seed(0)
    layer = HaloAttention(**LAYERS['stride1-proj']).eval()
    path = tmp_path_factory.mktemp('static') / 'static.onnx'
    return layer, ex.export_onnx(layer, path, ex.example_input(layer), dynamic_batch=False)


def test_layer_onnx_static_size_rejects_other_sizes(static_layer):
    """Without dynamic_size the graph is for one size, and ONNX Runtime refuses others (it does not guess)."""
    layer, path = static_layer
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    assert session.get_inputs()[0].shape == [2, 16, 11, 11]
    assert _ort_vs_eager(path, layer, torch.randn(2, 16, 11, 11)) <= ex.ONNX_ATOL
    with pytest.raises(Exception, match='(?i)dimension'):
        session.run(None, {'input': torch.randn(2, 16, 12, 11).numpy()})


def test_parity_check_detects_a_different_model(static_layer):
    layer, path = static_layer
    assert ex.onnx_parity(path, layer, [ex.example_input(layer)]).ok
    other = HaloAttention(**LAYERS['stride1-proj']).eval()  # same shapes, other weights
    report = ex.onnx_parity(path, other, [ex.example_input(layer)])
    assert not report.ok and report.max_abs_diff > 1e-2
    assert 'FAILED' in str(report)


def test_max_abs_diff_semantics():
    a = torch.tensor([1.0, float('nan'), 3.0])
    assert ex._max_abs_diff([a], [a.clone()]) == 0.0  # NaN where both are NaN is agreement
    assert ex._max_abs_diff([a], [torch.tensor([1.0, 2.0, 3.0])]) == float('inf')  # NaN on one side is not
    assert ex._max_abs_diff([a], [a[:2]]) == float('inf')  # nor a shape mismatch
    assert ex._max_abs_diff([a], [a, a]) == float('inf')  # nor a missing output
    assert ex._max_abs_diff([torch.ones(2)], [torch.ones(2) * 1.5]) == 0.5


# -- models ---------------------------------------------------------------------------------------------------------

@pytest.mark.heavy
def test_reduced_model_onnx_dynamic_batch(tmp_path):
    """halonet_h3's block design (b=10: 18x18 maps of 2x2 padded blocks, then 9x9 < b; final 1x1 conv) at a size
    that is not a multiple of 32; dynamic batch checked by the helper (batch 2 and 3) and independently (batch 1)."""
    model = _reduced('halonet_h3', num_classes=7)
    example = ex.example_input(model, img_size=72, batch_size=2)
    report = ex.export_onnx_checked(model, tmp_path / 'h3s.onnx', example)
    assert report.ok
    x = torch.randn(1, 3, 72, 72)
    assert _ort_vs_eager(tmp_path / 'h3s.onnx', model, x) <= ex.ONNX_ATOL

    # The check can see the attention layers: a graph that attended the zero-padded border (no mask) in just the
    # last of them would miss atol by far. (The exported path: plain ops on the layer's window plans.)
    attn = model.stages[-1].blocks[0].attn
    axis_terms = attn._axis_terms

    def unmasked_terms(size, blocks, plan, dtype, device):
        rows, mask = axis_terms(size, blocks, plan, dtype, device)
        return rows, torch.zeros_like(mask)

    attn._kept_axis_terms, attn._use_custom_kernels = unmasked_terms, lambda: False
    with torch.no_grad():
        unmasked = model(x)
    del attn._kept_axis_terms, attn._use_custom_kernels
    with torch.no_grad():
        assert (unmasked - model(x)).abs().max().item() > 10 * ex.ONNX_ATOL


# Distinct block designs in CI: b=10 with a final conv (h3), b=12 / rb=3 (h4), b=14 / rv=2.5 (h5), h=4 / rv=3 (h6).
# The others (b=8, h=3, and h7's b=10) run with the full-size family under -m slow; H0's below at its default size.
CI_VARIANTS = ('halonet_h3', 'halonet_h4', 'halonet_h5', 'halonet_h6')


@pytest.mark.heavy
@pytest.mark.parametrize('name', [n if n in CI_VARIANTS else pytest.param(n, marks=pytest.mark.slow) for n in NAMES])
def test_torch_export_reduced_variants(name):
    model = _reduced(name, num_classes=6)
    example = torch.randn(2, 3, 64, 48)
    program = ex.export_program(model, example)  # dynamic batch
    report = ex.program_parity(program, model, [example, torch.randn(3, 3, 64, 48)])
    assert report.ok, report
    # the exported graph holds no Python control flow on data: it is plain ATen ops
    targets = {str(n.target) for n in program.graph.nodes if n.op == 'call_function'}
    assert any('softmax' in t for t in targets)
    assert not [t for t in targets if 'timm_halo' in t]  # no custom op (timm_halo::attend_tiled, ...) leaks in


@pytest.mark.heavy
def test_torch_export_halonet_h0_default_size():
    """H0's block design (b=8, h=3) at its default input size (example_input reads it from the cfg), dynamic batch
    checked at batch 1. A second block in the last stage adds what one block per stage lacks: a block with an
    identity shortcut, and a stride-1 attention on a map of exactly one block. (H0 at full depth, 3-3-7-3 blocks
    of the same kinds, and every other variant: test_torch_export_every_model_default_size, -m slow.)"""
    torch.manual_seed(0)
    model = ex.wake_residual_branches(timm.create_model('halonet_h0', depths=(1, 1, 1, 2))).eval()
    assert isinstance(model.stages[3].blocks[1].shortcut, torch.nn.Identity)
    example = ex.example_input(model, batch_size=2)
    assert tuple(example.shape) == (2, 3, 256, 256)
    program = ex.export_program(model, example)
    report = ex.program_parity(program, model, [example[:1]])
    assert report.ok, report


def test_torch_export_refuses_dynamic_size():
    with pytest.raises(ValueError, match='dynamic height/width is not supported'):
        ex.export_program(HaloAttention(16, block_size=4, halo_size=1), torch.randn(1, 16, 8, 8), dynamic_size=True)


def test_export_refuses_non_fp32_models(tmp_path):
    layer = HaloAttention(16, block_size=4, halo_size=1).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r'fp32.*torch\.bfloat16'):
        ex.export_onnx(layer, tmp_path / 'x.onnx', torch.randn(1, 16, 8, 8, dtype=torch.bfloat16))


# -- the command line -----------------------------------------------------------------------------------------------

# H0's block design (b=8, h=3; one narrow stage: a quick export, the whole models run above and under -m slow)
CLI_EXPORT = ['export', '--model', 'halonet_h0', '--format', 'onnx', '--img-size', '72',
              '--model-args', 'depths=(1,)', 'widths=(16,)', 'stem_chs=16']


@pytest.fixture(scope='module')
def cli_export(tmp_path_factory):
    """`timm-halo export` run once: its exit status, the file and what it printed."""
    out = tmp_path_factory.mktemp('cli') / 'sub' / 'h0.onnx'
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main([*CLI_EXPORT, '--output', str(out)])
    return status, out, printed.getvalue()


@pytest.mark.heavy
def test_cli_export_halonet_h0(cli_export):
    """The command's export, its 18x18 map three blocks with padding: writes the file, reports parity; then an
    independent check at a batch size the command did not try."""
    status, out, printed = cli_export
    assert status == 0
    assert out.is_file() and str(out) in printed
    diff = float(re.search(r'max \|diff\| ([\d.e+-]+)', printed).group(1))
    assert diff <= ex.ONNX_ATOL and 'parity OK' in printed and '2x3x72x72, 3x3x72x72' in printed

    torch.manual_seed(0)  # the command's model: seed 0, every residual branch live
    model = ex.wake_residual_branches(timm.create_model('halonet_h0', depths=(1,), widths=(16,), stem_chs=16)).eval()
    assert _ort_vs_eager(out, model, torch.randn(1, 3, 72, 72)) <= ex.ONNX_ATOL


def test_cli_export_exits_nonzero_when_parity_fails(cli_export, capsys, monkeypatch):
    """The same command with ONNX Runtime's outputs shifted by 1e-3: parity fails, exit 1. The file it checks is
    the one exported above (exporting the same model again would only repeat that export)."""
    _, out, _ = cli_export
    monkeypatch.setattr(ex, 'export_onnx', lambda model, path, *args, **kwargs: Path(path))
    real = ex._ort_outputs
    monkeypatch.setattr(ex, '_ort_outputs', lambda session, x: [o + 1e-3 for o in real(session, x)])
    assert main([*CLI_EXPORT, '--output', str(out)]) == 1
    captured = capsys.readouterr()
    assert 'parity FAILED: max |diff| 0.001' in captured.out
    assert 'does not match PyTorch within --atol 0.0001' in captured.err


@pytest.mark.parametrize('args,message', [
    (['--model', 'halonet_h9'], "unknown model 'halonet_h9'"),
    (['--format', 'tflite'], "invalid choice: 'tflite'"),
    (['--img-size', '0'], '--img-size must be an integer >= 1'),
    (['--model-args', '[1, 2]'], 'takes key=value pairs'),
    (['--model-args', 'halo_sise=2'], "unexpected keyword argument 'halo_sise'"),
    (['--batch-size', '0'], '--batch-size must be >= 1'),
])
def test_cli_export_rejects_bad_arguments(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main(['export', '--output', str(tmp_path / 'x.onnx'), *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'x.onnx').exists()


# -- the whole family at full size (slow) ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('name', NAMES)
def test_onnx_every_model_default_size(tmp_path, name):
    model = _full(name)
    example = ex.example_input(model, batch_size=1)  # the model's default input size
    report = ex.export_onnx_checked(model, tmp_path / f'{name}.onnx', example)  # batch 1 and 2
    print(f'{name}: {report}')
    assert report.ok


@pytest.mark.slow
@pytest.mark.parametrize('name', NAMES)
def test_torch_export_every_model_default_size(name):
    model = _full(name)
    example = ex.example_input(model, batch_size=2)  # a batch of 1 would be specialised, not dynamic
    report = ex.program_parity(ex.export_program(model, example), model, [example[:1], example])
    print(f'{name}: {report}')
    assert report.ok


@pytest.mark.slow
def test_onnx_reduced_model_dynamic_size(tmp_path):
    """Dynamic height/width for a whole model (slow to export): checked at sizes far from the example's."""
    model = _reduced('halonet_h1', stages=4, num_classes=5)
    example = ex.example_input(model, img_size=64, batch_size=2)
    report = ex.export_onnx_checked(model, tmp_path / 'dyn.onnx', example, dynamic_size=True)
    assert report.ok
    for shape in [(1, 3, 97, 130), (2, 3, 33, 33), (1, 3, 1, 1)]:
        assert _ort_vs_eager(tmp_path / 'dyn.onnx', model, torch.randn(*shape)) <= ex.ONNX_ATOL, shape


@pytest.mark.parametrize('size, keys_per_axis', [(8, 8), (13, 11), (24, 14)])
def test_one_size_exports_crop_their_windows(monkeypatch, size, keys_per_axis):
    """An export of one input size cuts cropped key windows on maps of one or two blocks (8 or 11 rows instead of
    14 at block 8, halo 3), as eager mode does (ONNX exports with a dynamic height/width keep plain windows:
    test_layer_onnx_dynamic_batch_and_size). The exported graph equals the dense reference."""
    from timm_halo.layers import halo_attention
    lengths = []
    unfold = halo_attention.unfold_windows
    monkeypatch.setattr(halo_attention, 'unfold_windows', lambda *a: lengths.append(a[4]) or unfold(*a))
    layer = HaloAttention(8, block_size=8, halo_size=3, heads=2, dim_head=4).eval()
    x = torch.randn(2, 8, size, size)
    program = torch.export.export(layer, (x,), dynamic_shapes=({0: torch.export.Dim('batch', min=1)},))
    assert set(lengths) == {keys_per_axis}
    for batch in (2, 3):
        x = torch.randn(batch, 8, size, size)
        torch.testing.assert_close(program.module()(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('crop', [True, False])
def test_graphs_leave_out_only_masks_that_hide_nothing(crop):
    """A graph of one input size adds no border mask where the layer's own mask (``_axis_terms``) is all zeros:
    the static check agrees with that mask for every size, block, halo and stride tried."""
    for block, halo, stride in [(8, 3, 1), (8, 3, 2), (4, 1, 1), (4, 0, 2), (10, 4, 1), (2, 2, 1), (3, 1, 1)]:
        layer = HaloAttention(8, block_size=block, halo_size=halo, heads=1, dim_head=4, stride=stride)
        for size in range(1, 4 * block + 3):
            blocks = -(-size // block)
            plan = layer._window_plan(size, blocks, crop)
            _, mask = layer._axis_terms(size, blocks, plan, torch.float32, torch.device('cpu'))
            assert layer._sees_only_visible_keys(size, blocks, plan) == bool((mask == 0).all()), (
                block, halo, stride, size)


@pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning')
@pytest.mark.parametrize('stride', [1, 2])
def test_traced_graph_keeps_what_other_sizes_need(stride):
    """``torch.jit.trace`` at a size that needs no padding, crop or mask (16 at block 8, no halo) gives one graph
    for every size (docs/contract.md): run at sizes that need all three, it still equals the dense reference."""
    layer = HaloAttention(16, block_size=8, halo_size=0, heads=2, dim_head=8, stride=stride).eval()
    traced = torch.jit.trace(layer, (torch.randn(1, 16, 16, 16),))
    for size in (16, 12, 20):
        x = torch.randn(2, 16, size, size)
        torch.testing.assert_close(traced(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('crop', [True, False])
def test_graph_path_matches_reference_at_every_size(crop):
    """The ops exported graphs are built from (``_graph_forward``, run eagerly here: the same ops the exporters
    record) equal the dense reference for every size up to three blocks, square or not: maps of one and two blocks
    with cropped windows (per-block tables), several blocks, partial blocks, border masks on one axis or both."""
    designs = [dict(block_size=8, halo_size=3), dict(block_size=8, halo_size=3, stride=2),
               dict(block_size=4, halo_size=1, value_ratio=2.0), dict(block_size=2, halo_size=3, stride=2),
               dict(block_size=4, halo_size=0)]
    for design in designs:
        torch.manual_seed(0)
        layer = HaloAttention(8, heads=2, dim_head=4, dim_out=8, **design).eval()
        b = design['block_size']
        for height, width in [(s, s) for s in range(1, 3 * b + 2)] + [(1, 3 * b), (2 * b, b + 1), (3 * b - 1, 2)]:
            x = torch.randn(2, 8, height, width)
            with torch.no_grad():
                got = layer.proj(layer._graph_forward(x, crop))
                where = f'{design} {height}x{width}'
                torch.testing.assert_close(got, layer.reference_forward(x), rtol=1e-5, atol=1e-5,
                                           msg=lambda m, where=where: f'{where}: {m}')


@pytest.mark.heavy
@pytest.mark.parametrize('size', [7, 10, 19, 75])
def test_onnx_export_from_a_batch_of_one_keeps_the_dynamic_batch(tmp_path, size):
    """An example batch of 1 still gives a graph for any batch: nothing in the layer asks whether the batch is 1.
    At block 10: 7 and 10 px, one block (padded, and not); 19 px, two cropped blocks, one matrix per block; 75 px,
    eight blocks, with padding."""
    torch.manual_seed(0)
    layer = HaloAttention(8, block_size=10, halo_size=3, heads=2, dim_head=4).eval()
    path = ex.export_onnx(layer, tmp_path / 'layer.onnx', torch.randn(1, 8, size, size))
    assert _ort_vs_eager(path, layer, torch.randn(3, 8, size, size)) <= ex.ONNX_ATOL


class _AsksIfBatchIsOne(torch.nn.Module):
    """Branches on the batch size, as the first graph-path draft did by accident: the exporter then fixes it."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[0] == 1 else x * 3


def test_onnx_export_refuses_to_fix_a_dynamic_axis(tmp_path):
    """torch.onnx.export falls back to the example's size where a model asks about a dynamic one; export_onnx then
    raises instead of writing a file that rejects every other batch."""
    path = tmp_path / 'fixed.onnx'
    with pytest.raises(RuntimeError, match=r'fixed dynamic input axes .*batch = 1'):
        ex.export_onnx(_AsksIfBatchIsOne(), path, torch.randn(1, 3, 8, 8))
    assert not path.exists()
    ex.export_onnx(_AsksIfBatchIsOne(), path, torch.randn(1, 3, 8, 8), dynamic_batch=False)  # asked static: fine
    assert path.exists()
