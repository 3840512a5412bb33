"""The fused C kernel (layers/fused_cpu.py, fused_cpu.c) against the whole-tensor kernel and the layer's reference.

The layer-level paths (every case of test_halo_attention.py, test_numerics.py) run it as ``'fused'`` too; here are
the kernel's own edges: key rows of every width, query and channel counts that are not multiples of its register
blocks, masked keys, NaN rows, threads, dtypes, the custom op's registration. Its build, cache and threads under
adversity: test_kernel_safety.py.
"""
import os
import subprocess
import sys

import pytest
import torch
from timm.layers.halo_attn import HaloAttn

from timm_halo import accelerate
from timm_halo.layers import HaloAttention, attend_broadcast, attend_fused, fused_cpu
from timm_halo.layers.fused_cpu import attend_fused_maps, attend_fused_tables, expand_tables

pytestmark = pytest.mark.skipif(not fused_cpu.available(), reason=f'no C kernel: {fused_cpu.unavailable_reason()}')

MASKED = torch.finfo(torch.float32).min / 4  # the layer's border mask value
# 'auto' runs the kernel where it is built for 32-byte vectors or wider (AVX2, AVX-512)
AUTO_RUNS_IT = pytest.mark.skipif(not fused_cpu.preferred(), reason="built for 16-byte vectors: 'auto' runs 'tiled'")


def _inputs(n, d, dv, bq, kh, kw, dtype=torch.float64, seed=0, mask=True):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(n, d, bq * bq, generator=g, dtype=dtype), torch.randn(n, d, kh * kw, generator=g, dtype=dtype)
    v = torch.randn(n, dv, kh * kw, generator=g, dtype=dtype)
    rel_h, rel_w = torch.randn(n, bq, bq, kh, generator=g, dtype=dtype), torch.randn(n, bq, bq, kw, generator=g,
                                                                                     dtype=dtype)
    if mask:  # border keys as the layer masks them: whole key rows / columns of some windows
        rel_h[::3, ..., 0] = MASKED
        rel_w[1::4, ..., -1] = MASKED
    return [t.requires_grad_() for t in (q, k, v, rel_h, rel_w)]


# (windows, d, dv, bq, kh, kw): stage-1, stage-3 and stage-4 shapes; key rows of 1, 16 (exactly one fp32 vector),
# 17 and 33 keys, windows of fewer keys than a vector; query and channel counts that are not multiples of the
# matrix products' register blocks (4 or 8 rows, 1-4 vectors), channels wider than one vector and odd
SHAPES = [(6, 8, 8, 8, 14, 14), (3, 32, 32, 8, 11, 11), (2, 64, 64, 8, 8, 8), (4, 5, 7, 3, 5, 1),
          (3, 3, 2, 1, 16, 16), (2, 4, 6, 5, 17, 33), (5, 1, 1, 2, 2, 3), (2, 20, 36, 4, 7, 9)]


@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_matches_broadcast_kernel_fp64_outputs_and_gradients(shape):
    args = _inputs(*shape)
    grad = torch.randn(shape[0], shape[2], shape[3] ** 2, dtype=torch.float64)
    ref = attend_broadcast(*args, 0.37)
    out = attend_fused(*args, 0.37)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out, args, grad), torch.autograd.grad(ref, args, grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('shape', SHAPES[:3] + SHAPES[-1:], ids=lambda s: 'x'.join(map(str, s)))
def test_fp32_matches_fp64_reference(shape):
    args64 = _inputs(*shape, mask=False)
    args32 = [t.detach().float().requires_grad_() for t in args64]
    grad = torch.randn(shape[0], shape[2], shape[3] ** 2, dtype=torch.float64)
    ref = attend_broadcast(*args64, 0.37)
    out = attend_fused(*args32, 0.37)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    ref_grads = torch.autograd.grad(ref, args64, grad)
    for a, b in zip(torch.autograd.grad(out, args32, grad.float()), ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_gradcheck_and_gradgradcheck():
    args = _inputs(3, 3, 2, 3, 4, 5)
    assert torch.autograd.gradcheck(lambda *a: attend_fused(*a, 0.5), args)
    assert torch.autograd.gradgradcheck(lambda *a: attend_fused(*a, 0.5), args)


def test_masked_keys_get_exactly_zero_probability():
    # Values of fully masked key columns are huge: any probability leaking to them would show in the output.
    q, k, v, rel_h, rel_w = (t.detach() for t in _inputs(4, 8, 8, 8, 14, 14, dtype=torch.float32, mask=False))
    rel_w[..., -3:] = MASKED
    v = v.view(4, 8, 14, 14).clone()
    v[..., -3:] = 1e30
    out = attend_fused(q, k, v.view(4, 8, -1), rel_h, rel_w, 0.35)
    kept = attend_broadcast(q, k.view(4, 8, 14, 14)[..., :-3].reshape(4, 8, -1), v[..., :-3].reshape(4, 8, -1),
                            rel_h, rel_w[..., :-3], 0.35)
    torch.testing.assert_close(out, kept, rtol=1e-5, atol=1e-5)


def test_nan_stays_in_its_query_row_as_in_softmax():
    q, k, v, rel_h, rel_w = (t.detach() for t in _inputs(2, 4, 4, 4, 5, 5, dtype=torch.float32))
    q[1, :, 5] = float('nan')
    out, ref = attend_fused(q, k, v, rel_h, rel_w, 0.5), attend_broadcast(q, k, v, rel_h, rel_w, 0.5)
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().sum() == 4  # query 5 of window 1, every channel
    torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num(), rtol=1e-5, atol=1e-5)


def test_threads_do_not_change_the_result():
    args = [t.detach() for t in _inputs(37, 8, 8, 8, 14, 14, dtype=torch.float32)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = attend_fused(*args, 0.35)
        torch.set_num_threads(3)
        three = attend_fused(*args, 0.35)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)  # windows are independent: same arithmetic whichever thread runs them


def test_threads_do_not_change_the_maps_backward():
    """The backward adds each key window's gradients into the key / value map, where neighbouring windows overlap:
    every range of windows covers whole images and heads, so no two threads add to one element and the map's
    gradient is the same, bit for bit, whatever the threads (the tables' gradients are summed per range)."""
    layer = HaloAttention(16, block_size=4, halo_size=2, heads=2, dim_head=8)
    q, kv, tables, window = _map_inputs(layer, torch.randn(5, 16, 13, 11))
    grads, previous = [], torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            inputs = [t.clone().requires_grad_() for t in (q, kv, *tables[:2])]
            out = attend_fused_maps(*inputs[:2], *inputs[2:], *tables[2:], window, layer.scale)
            grads.append(torch.autograd.grad(out.square().sum(), inputs))
    finally:
        torch.set_num_threads(previous)
    (gq1, gkv1, *tables1), (gq3, gkv3, *tables3) = grads
    assert torch.equal(gq1, gq3) and torch.equal(gkv1, gkv3)
    for a, b in zip(tables1, tables3):
        # Per-range sums added in another order: float rounding relative to the gradient's scale (a fixed atol
        # failed where one small entry of a large gradient, 0.49 of ~20, moved by 8e-6; 60 seeds stay below 5e-7).
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * a.abs().max().item())


def test_backward_ranges_that_split_an_image_are_refused(monkeypatch):
    """A range of windows that ends inside an image's group would add to the map beside another thread's range:
    the kernel refuses such a call (an error, not a race)."""
    layer = HaloAttention(16, block_size=4, halo_size=1, heads=2, dim_head=8, attn_impl='fused')
    x = torch.randn(2, 16, 8, 8, requires_grad=True)  # 2 x 2 windows per image and head
    out = layer(x).sum()
    monkeypatch.setattr(fused_cpu, '_chunk', lambda n, group=1: 3)
    with pytest.raises(ValueError, match='do not fit together'):
        out.backward()


def test_bf16_is_computed_in_fp32_and_returned_in_bf16():
    args = [t.detach().bfloat16().requires_grad_() for t in _inputs(3, 8, 8, 4, 6, 6, dtype=torch.float32)]
    out = attend_fused(*args, 0.35)
    assert out.dtype == torch.bfloat16
    ref = attend_broadcast(*(t.detach().float() for t in args), 0.35)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    out.sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in args)


def _table_inputs(layer: HaloAttention, x: torch.Tensor):
    """What the layer hands the table form of the kernel (table rows as the op takes them: int32), and the per-axis
    terms it hands every other kernel."""
    with torch.no_grad():
        q, k, v, plain, _ = layer._blocked(x, crop=True, gather_op=True)
    tables = _map_inputs(layer, x)[2]
    return q, k, v, tables, plain


# (channels, H, W, block, halo, stride): plain windows, one block per axis, two blocks, stride 2, halo > block
GEOMETRIES = [(8, 13, 11, 4, 1, 1), (8, 7, 5, 8, 3, 1), (8, 13, 16, 8, 3, 1), (8, 10, 9, 4, 1, 2),
              (8, 9, 14, 2, 5, 1), (8, 16, 11, 8, 2, 2)]


@pytest.mark.parametrize('geometry', GEOMETRIES, ids=lambda g: 'x'.join(map(str, g)))
def test_table_form_gives_the_layers_relative_terms(geometry):
    """What the kernel reads from the table products (expand_tables, its plain-op twin) is exactly the layer's
    per-axis terms of every other kernel, masks included."""
    channels, H, W, block, halo, stride = geometry
    layer = HaloAttention(channels, block_size=block, halo_size=halo, heads=2, dim_head=4, stride=stride).double()
    q, _, _, tables, (rel_h, rel_w) = _table_inputs(layer, torch.randn(3, channels, H, W, dtype=torch.double))
    got_h, got_w = expand_tables(q, *tables)
    torch.testing.assert_close(got_h, rel_h, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(got_w, rel_w, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize('geometry', GEOMETRIES[:4], ids=lambda g: 'x'.join(map(str, g)))
def test_table_kernel_matches_broadcast_kernel(geometry):
    channels, H, W, block, halo, stride = geometry
    layer = HaloAttention(channels, block_size=block, halo_size=halo, heads=2, dim_head=4, stride=stride).double()
    q, k, v, tables, (rel_h, rel_w) = _table_inputs(layer, torch.randn(2, channels, H, W, dtype=torch.double))
    q, k, v, qt_h, qt_w = (t.clone().requires_grad_() for t in (q, k, v, *tables[:2]))
    out = attend_fused_tables(q, k, v, qt_h, qt_w, *tables[2:], layer.scale)
    ref = attend_broadcast(q, k, v, *expand_tables(q, qt_h, qt_w, *tables[2:]), layer.scale)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    inputs = (q, k, v, qt_h, qt_w)
    for a, b in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _map_inputs(layer: HaloAttention, x: torch.Tensor):
    """What the layer hands the maps form of the kernel: q and kv maps, the tables and the window list."""
    H, W = x.shape[-2:]
    nh, nw = -(-H // layer.block_size), -(-W // layer.block_size)
    with torch.no_grad():
        q, kv = layer.q(x[:, :, ::layer.stride, ::layer.stride]), layer.kv(x)
        plan_h, plan_w = layer._window_plan(H, nh, True), layer._window_plan(W, nw, True)
        (rows_h, mask_h), (rows_w, mask_w) = (layer._axis_terms(H, nh, plan_h, x.dtype, x.device),
                                              layer._axis_terms(W, nw, plan_w, x.dtype, x.device))
    tables = [layer.rel_pos_h.detach(), layer.rel_pos_w.detach(), rows_h[:, :, 0].to(torch.int32),
              rows_w[:, :, 0].to(torch.int32), mask_h, mask_w]
    return q, kv, tables, [layer.heads, plan_h[2], plan_h[0], plan_w[2], plan_w[0]]


def test_inconsistent_operands_are_errors_not_bad_reads():
    """The ops read raw memory at offsets from the shapes: called directly with operands that do not fit together,
    they refuse (windows one after another, and maps; forward and backward)."""
    layer = HaloAttention(8, block_size=4, halo_size=1, heads=2, dim_head=4)
    x = torch.randn(1, 8, 8, 8)
    q, k, v, tables, _ = _table_inputs(layer, x)
    op = torch.ops.timm_halo.attend_fused.default
    with pytest.raises(ValueError, match=r'\[8, 4, 20\] \(expected \[8, 4, 25\]\)'):
        op(q, k[..., :20], v, *tables, [], layer.scale)  # two blocks per axis: cropped windows of 5 x 5 keys
    with pytest.raises(ValueError, match='inconsistent fused-kernel operands'):
        op(q[:5], k[:5], v[:5], *(t[:5] for t in tables[:2]), *tables[2:], [], layer.scale)  # not whole images
    with pytest.raises(TypeError, match='int32'):
        op(q, k, v, *tables[:2], tables[2].long(), *tables[3:], [], layer.scale)
    out, stats = op(q, k, v, *tables, [], layer.scale)
    with pytest.raises(ValueError, match='inconsistent fused-kernel operands'):  # a gradient of another shape
        torch.ops.timm_halo.attend_fused_backward.default(out[..., 1:], q, k, v, *tables, out, stats, [], layer.scale)
    q, kv, tables, window = _map_inputs(layer, x)
    with pytest.raises(ValueError, match='inconsistent fused-kernel operands'):
        op(q[..., :4, :], kv, None, *tables, window, layer.scale)  # one block row of queries for two of tables
    with pytest.raises(ValueError, match='inconsistent fused-kernel operands'):
        op(q, kv[:, :8], None, *tables, window, layer.scale)  # no value channels


@pytest.mark.parametrize('form', ['windows', 'maps'])
def test_custom_op_registration_passes_opcheck(form):
    layer = HaloAttention(8, block_size=4, halo_size=1, heads=2, dim_head=4, stride=2)
    x = torch.randn(2, 8, 10, 9)
    if form == 'windows':
        q, k, v, tables, _ = _table_inputs(layer, x)
        inputs, window = [t.clone().requires_grad_() for t in (q, k, v, *tables[:2])], []
    else:
        q, kv, tables, window = _map_inputs(layer, x)
        inputs = [q.clone().requires_grad_(), kv.clone().requires_grad_(), None,
                  *(t.clone().requires_grad_() for t in tables[:2])]
    torch.library.opcheck(torch.ops.timm_halo.attend_fused.default, (*inputs, *tables[2:], window, layer.scale))


def test_table_row_outside_the_table_is_an_error_not_a_read_out_of_bounds():
    layer = HaloAttention(8, block_size=4, halo_size=1, heads=2, dim_head=4)
    q, k, v, tables, _ = _table_inputs(layer, torch.randn(1, 8, 8, 8))
    base_h = tables[2].clone()
    base_h[1, 0] = tables[0].shape[0] - 2  # key rows run past the last table row
    with pytest.raises(IndexError, match='relative-table row outside the table'):
        attend_fused_tables(q, k, v, tables[0], tables[1], base_h, *tables[3:], layer.scale)


@AUTO_RUNS_IT
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_windows_wider_than_the_vector_row_path_match_the_reference(dtype):
    """Key windows of 129 columns (block 128, halo 1, two cropped blocks across 140 px) are wider than the rows the
    AVX-512 build moves with masked vector loads (128 floats, 64 doubles): they take the scalar row copies, with the
    border blocks' visible keys cut out as elsewhere. Outputs and gradients against the dense reference."""
    torch.manual_seed(0)
    layer = HaloAttention(8, block_size=128, halo_size=1, heads=2, dim_head=4, attn_impl='fused').to(dtype)
    x = torch.randn(1, 8, 5, 140, dtype=dtype, requires_grad=True)
    out, ref = layer(x), layer.reference_forward(x)
    fp32 = dtype == torch.float32
    torch.testing.assert_close(out, ref, **({'rtol': 1e-5, 'atol': 1e-5} if fp32 else {'rtol': 1e-10, 'atol': 1e-12}))
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [x, *layer.parameters()], grad),
                    torch.autograd.grad(ref, [x, *layer.parameters()], grad)):  # table gradients: sums of ~10^3
        torch.testing.assert_close(a, b, **({'rtol': 1e-4, 'atol': 1e-4} if fp32 else {'rtol': 1e-9, 'atol': 1e-11}))


_AVX512_HERE = torch.backends.cpu.get_cpu_capability() == 'AVX512'


@pytest.mark.skipif(not _AVX512_HERE, reason='the AVX2 build is checked from an AVX-512 CPU (lowered capability)')
def test_avx2_build_matches_the_reference(tmp_path):
    """The kernel built for AVX2 (PyTorch's capability lowered, in a fresh process): its masked-load window rows
    (stored whole, their overrun landing in slack, zero padding or the next row) against the dense reference, at
    border blocks, a stride-2 layer (4 x 4 queries) and a 5 x 5 block (queries padded to a whole vector), fp32 and
    fp64, outputs and gradients. CI runs on AVX-512 machines, which never build this variant otherwise."""
    code = (
        'import torch\n'
        'from timm_halo.layers import HaloAttention, fused_cpu\n'
        'assert fused_cpu.target()[0] == "avx2", fused_cpu.target()\n'
        'torch.manual_seed(0)\n'
        'for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-9)):\n'
        '    for kw, size in ((dict(block_size=8, halo_size=3), (21, 30)), (dict(block_size=8, halo_size=3, stride=2),'
        ' (19, 16)), (dict(block_size=5, halo_size=2), (12, 11))):\n'
        '        layer = HaloAttention(16, heads=2, dim_head=8, attn_impl="fused", **kw).to(dtype)\n'
        '        x = torch.randn(2, 16, *size, dtype=dtype, requires_grad=True)\n'
        '        out, ref = layer(x), layer.reference_forward(x)\n'
        '        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)\n'
        '        g = torch.randn_like(out)\n'
        '        for a, b in zip(torch.autograd.grad(out, [x, *layer.parameters()], g),\n'
        '                        torch.autograd.grad(ref, [x, *layer.parameters()], g)):\n'
        '            torch.testing.assert_close(a, b, rtol=tol, atol=tol)\n'
        'print("ok")\n')
    env = {**os.environ, 'TIMM_HALO_CACHE': str(tmp_path / 'cache'), 'ATEN_CPU_CAPABILITY': 'avx2'}
    done = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ['ok']


def test_layer_auto_runs_the_fused_kernel_on_cpu():
    layer = HaloAttention(16, block_size=4, halo_size=1, heads=2, dim_head=8)
    x = torch.randn(2, 16, 12, 12)
    assert layer._call_plan(x)[0] == 'fused'
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert layer._call_plan(x)[0] == 'fused'
        assert layer(x).dtype == torch.bfloat16


@AUTO_RUNS_IT
def test_auto_runs_the_fused_kernel_at_every_head_width():
    """Built for AVX2 or AVX-512, the fused kernel is faster than the others at every HaloNet shape (narrow heads,
    where the tiled kernel's passes cost most, up to 128 channels per head): 'auto' runs it on CPU, timm's layer
    alike."""
    x = torch.empty(4, 64, 64, 64)
    for dim_head in (8, 16, 32, 64, 128):
        layer = HaloAttention(64, block_size=4, halo_size=1, heads=2, dim_head=dim_head)
        assert layer._call_plan(x)[0] == 'fused'
        assert layer._call_plan(torch.empty(1, 64, 4, 4))[0] == 'fused'  # small calls too
    wide_values = HaloAttention(64, block_size=4, halo_size=1, heads=2, dim_head=8, value_ratio=4.0)
    assert wide_values._call_plan(x)[0] == 'fused'
    timm_layer = accelerate(HaloAttn(64, 64, num_heads=2, dim_head=32, block_size=4, halo_size=1))
    assert timm_layer._call_plan(x)[0] == 'fused'


def test_first_use_under_torch_compile(tmp_path):
    """A fresh process whose first call of the layer is compiled (fullgraph): dynamo must not trace the kernel's
    build (a lock and a compiler run); it takes the availability as a constant."""
    code = (
        'import torch\n'
        'from timm_halo.layers import HaloAttention\n'
        'layer = HaloAttention(16, block_size=4, halo_size=1, heads=2, dim_head=8)\n'
        'x = torch.randn(2, 16, 12, 12, requires_grad=True)\n'
        'out = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)\n'
        'out.sum().backward()\n'
        'torch.testing.assert_close(out, layer.reference_forward(x), rtol=1e-5, atol=1e-5)\n'
        'print(layer._call_plan(x)[0])\n')
    env = {**os.environ, 'TIMM_HALO_CACHE': str(tmp_path / 'cache')}
    env.pop('TIMM_HALO_ATTN_IMPL', None)
    done = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ['fused' if fused_cpu.preferred() else 'broadcast']


@pytest.mark.skipif(not fused_cpu._torch_openmp(), reason='no OpenMP runtime in torch/lib')
def test_ranges_run_on_pytorchs_own_openmp_team(monkeypatch):
    """Built against torch/lib's libgomp, the kernel runs its ranges on ATen's threads in one C call (never the tile
    pool), with one OpenMP runtime in the process, and forward and backward equal the dense reference."""
    assert fused_cpu._library(torch.float64).all_ranges is not None
    with open('/proc/self/maps') as maps:
        runtimes = {line.split()[-1] for line in maps if 'libgomp' in line}
    assert len(runtimes) == 1 and all(path.startswith(os.path.dirname(torch.__file__)) for path in runtimes)
    monkeypatch.setattr(fused_cpu, 'run_tiles', lambda *a, **k: pytest.fail('ran on the tile pool'))
    _check_against_reference_on_two_threads()


def _check_against_reference_on_two_threads() -> None:
    """The fused layer's output and its gradients (input, table) equal the dense reference's, run on 2 threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        layer = HaloAttention(16, block_size=4, halo_size=1, heads=2, dim_head=8, attn_impl='fused').double()
        x = torch.randn(3, 16, 13, 11, dtype=torch.double, requires_grad=True)
        out, ref = layer(x), layer.reference_forward(x)
        grads = torch.autograd.grad(out.square().sum(), (x, layer.rel_pos_h))
        ref_grads = torch.autograd.grad(ref.square().sum(), (x, layer.rel_pos_h))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_rows_kept_from_an_inference_call_serve_a_training_call():
    """The layer keeps each input size's table rows and masks: made under inference_mode, they must still serve a
    later call that records gradients, and a new size gets its own."""
    layer = HaloAttention(16, block_size=4, halo_size=1, heads=2, dim_head=8, attn_impl='fused').double()
    for size in (9, 12, 9):
        x = torch.randn(2, 16, size, size, dtype=torch.double, requires_grad=True)
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-10, atol=1e-10)
        grad, = torch.autograd.grad(layer(x).square().sum(), x)
        ref, = torch.autograd.grad(layer.reference_forward(x).square().sum(), x)
        torch.testing.assert_close(grad, ref, rtol=1e-9, atol=1e-9)


def test_without_openmp_the_ranges_run_on_the_tile_pool(monkeypatch):
    """Where the kernel could not be linked against PyTorch's OpenMP runtime, its ranges run on the tile pool, the
    calling thread taking one share: forward and backward equal the dense reference."""
    kernel = fused_cpu._library(torch.float64)
    monkeypatch.setitem(fused_cpu._libs, torch.float64, kernel._replace(all_ranges=None))
    calls = []
    run_tiles = fused_cpu.run_tiles
    monkeypatch.setattr(fused_cpu, 'run_tiles', lambda *a, **k: calls.append(k) or run_tiles(*a, **k))
    _check_against_reference_on_two_threads()
    assert calls == [{'caller_runs': True}] * 2  # forward and backward
