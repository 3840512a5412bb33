"""HaloAttention: fast paths against the dense reference, and the reference against independent checks."""
import itertools
import math
import random

import pytest
import torch
from timm.layers.halo_attn import HaloAttn

from timm_halo.layers import HaloAttention, fused_cpu, kernels

# Every kernel of the implementation table, as eager mode runs it (cropped windows on maps of one or two blocks
# per axis, the window-gather op), plus the plain-window variants that TorchScript, tracing and export run. The
# fused C kernel needs a C compiler; without one 'auto' runs 'tiled' and 'fused' has nothing to test.
PATHS = ['fused', 'tiled', 'sdpa', 'broadcast', 'sdpa-plain', 'broadcast-plain'][0 if fused_cpu.available() else 1:]


def _forward(layer: HaloAttention, x: torch.Tensor, path: str) -> torch.Tensor:
    """``layer(x)`` through one kernel; ``-plain``: with plain (uncropped) windows and plain ATen ops."""
    impl, _, plain = path.partition('-')
    layer.attn_impl = impl
    if plain:
        layer._use_custom_kernels = lambda: False  # what tracing/export see; an instance attribute, removed below
    try:
        return layer(x)
    finally:
        layer.attn_impl = 'auto'
        layer.__dict__.pop('_use_custom_kernels', None)


def _randomize(layer: HaloAttention, seed: int) -> HaloAttention:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return layer


def _naive_pixel(layer: HaloAttention, x: torch.Tensor, batch: int, head: int, oy: int, ox: int) -> torch.Tensor:
    """Output of one head at one output pixel with scalar loops over its window: a third implementation."""
    b, h, s = layer.block_size, layer.halo_size, layer.stride
    d, dv = layer.dim_head, layer.dim_head_v
    H, W = x.shape[-2:]
    q_all, kv_all = layer.q(x)[batch], layer.kv(x)[batch]
    qy, qx = oy * s, ox * s
    q = q_all[head * d:(head + 1) * d, qy, qx]
    top, left = (qy // b) * b - h, (qx // b) * b - h
    logits, values = [], []
    for ky in range(max(top, 0), min(top + b + 2 * h, H)):
        for kx in range(max(left, 0), min(left + b + 2 * h, W)):
            k = kv_all[head * (d + dv):head * (d + dv) + d, ky, kx]
            v = kv_all[head * (d + dv) + d:(head + 1) * (d + dv), ky, kx]
            rel = layer.rel_pos_h[ky - qy + b + h - 1] + layer.rel_pos_w[kx - qx + b + h - 1]
            logits.append(layer.scale * (q @ k) + q @ rel)
            values.append(v)
    attn = torch.stack(logits).softmax(0)
    return (attn[:, None] * torch.stack(values)).sum(0)


# (channels, H, W, block, halo, stride, heads, dim_head, value_ratio)
CASES = [
    (16, 8, 8, 4, 1, 1, 2, 8, 1.0),      # divisible
    (16, 13, 10, 4, 2, 1, 2, 8, 1.0),    # not divisible
    (16, 13, 10, 4, 2, 2, 2, 8, 2.0),    # strided, rv=2
    (8, 7, 9, 2, 0, 2, 1, 4, 1.0),       # no halo, strided
    (12, 11, 5, 6, 3, 2, 3, 4, 1.5),     # block larger than the map in one axis
    (8, 3, 4, 8, 3, 1, 2, 4, 1.0),       # map smaller than one block
    (8, 9, 9, 3, 4, 1, 2, 4, 1.0),       # halo larger than block
    (16, 7, 17, 4, 3, 1, 2, 8, 1.0),     # two blocks (cropped windows, ragged) by five (plain windows)
    (16, 16, 9, 8, 3, 2, 2, 4, 1.0),     # two by two blocks, strided: the H1 stage-4 entry in miniature
]


def _random_cases(n: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        stride = rng.choice((1, 2))
        block = rng.choice((2, 4, 6) if stride == 2 else (1, 2, 3, 4, 5))
        yield (rng.choice((4, 8)) * 2, rng.randint(1, 14), rng.randint(1, 14), block, rng.randint(0, 3), stride,
               rng.choice((1, 2)), rng.choice((2, 4)), rng.choice((0.5, 1.0, 2.0)))


@pytest.mark.parametrize('case', CASES + list(_random_cases(12)))
def test_fast_paths_match_reference_fp32(case):
    C, H, W, b, h, s, heads, dh, rv = case
    torch.manual_seed(sum(case[:6]))
    layer = HaloAttention(C, block_size=b, halo_size=h, heads=heads, dim_head=dh, stride=s, value_ratio=rv)
    x = torch.randn(3, C, H, W)
    ref = layer.reference_forward(x)
    assert ref.shape == (3, layer.dim_out, math.ceil(H / s), math.ceil(W / s))
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-5)
    for path in PATHS:
        torch.testing.assert_close(_forward(layer, x, path), ref, rtol=0, atol=1e-5, msg=path)


@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('path', PATHS)
def test_gradients_match_reference_fp64(case, path):
    C, H, W, b, h, s, heads, dh, rv = case
    torch.manual_seed(1)
    layer = _randomize(
        HaloAttention(C, block_size=b, halo_size=h, heads=heads, dim_head=dh, stride=s, value_ratio=rv).double(), 2)
    x = torch.randn(2, C, H, W, dtype=torch.double, requires_grad=True)
    fast = _forward(layer, x, path)
    ref = layer.reference_forward(x)
    grad_out = torch.randn_like(ref)
    inputs = [x] + list(layer.parameters())
    fast_grads = torch.autograd.grad((fast * grad_out).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * grad_out).sum(), inputs)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    for name, g_fast, g_ref in zip(['x'] + [n for n, _ in layer.named_parameters()], fast_grads, ref_grads):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-9, msg=f'gradient of {name}')


def test_tiled_kernel_gradcheck_with_several_tiles(monkeypatch):
    # Force many small tiles so the tile loop and its slicing are exercised in the backward pass too.
    monkeypatch.setattr(kernels, 'TILE_LOGITS', 1)
    layer = HaloAttention(8, block_size=2, halo_size=1, heads=2, dim_head=2, stride=2, attn_impl='tiled').double()
    x = torch.randn(2, 8, 5, 6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_reference_matches_per_pixel_loops():
    torch.manual_seed(3)
    for C, H, W, b, h, s, heads, dh, rv in CASES:
        # dim_out = value width: no output projection, so the reference's output is the attention itself
        layer = _randomize(HaloAttention(
            C, block_size=b, halo_size=h, heads=heads, dim_head=dh, stride=s, value_ratio=rv,
            dim_out=heads * round(dh * rv)), 4)
        assert isinstance(layer.proj, torch.nn.Identity)
        x = torch.randn(2, C, H, W)
        with torch.no_grad():
            ref = layer.reference_forward(x)
            Hq, Wq = ref.shape[-2:]
            dv = layer.dim_head_v
            corners = {(0, 0), (Hq - 1, Wq - 1), (0, Wq - 1), (Hq // 2, Wq // 2)}
            for (oy, ox), batch, head in itertools.product(corners, (0, 1), range(heads)):
                expected = _naive_pixel(layer, x, batch, head, oy, ox)
                got = ref[batch, head * dv:(head + 1) * dv, oy, ox]
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('size', [(16, 16), (13, 9)])
def test_border_halo_is_masked_not_zero_padded_nor_inverted(size):
    """A constant image must map to a constant output equal to the value projection of that constant.

    Masked borders: every query averages identical values -> exact. timm's HaloAttn attends zero-padded
    keys (zero values leak in at the border); the inverted mask of old lucidrains copies attends only to
    padding. Both break this at the border.
    """
    torch.manual_seed(0)
    layer = HaloAttention(8, block_size=4, halo_size=2, heads=2, dim_head=4)
    x = torch.full((1, 8, *size), 0.7)
    with torch.no_grad():
        out = layer(x)
        v = layer.kv(x)[:, :, 0, 0].reshape(2, 8)[:, 4:].reshape(1, 8, 1, 1)
    torch.testing.assert_close(out, v.expand_as(out), rtol=1e-5, atol=1e-6)

    # timm's layer at the same weights fails this at the border (and only there) -- the test can fail.
    timm_layer = _timm_twin(layer)
    if size[0] % 4 == 0 and size[1] % 4 == 0:
        with torch.no_grad():
            timm_out = timm_layer(x)
        border_err = (timm_out - v).abs()[..., 0, 0].max()
        interior_err = (timm_out - v).abs()[..., 4:12, 4:12].max()
        assert border_err > 1e-3 and interior_err < 1e-5


def _timm_twin(layer: HaloAttention) -> HaloAttn:
    """timm's HaloAttn with our layer's weights (stride 1): its tables hold 2h extra leading rows."""
    twin = HaloAttn(layer.dim, layer.heads * layer.dim_head_v, num_heads=layer.heads, dim_head=layer.dim_head,
                    block_size=layer.block_size, halo_size=layer.halo_size)
    h2 = 2 * layer.halo_size
    with torch.no_grad():
        twin.q.weight.copy_(layer.q.weight)
        twin.kv.weight.copy_(layer.kv.weight)
        twin.pos_embed.height_rel[h2:].copy_(layer.rel_pos_h)
        twin.pos_embed.width_rel[h2:].copy_(layer.rel_pos_w)
    return twin


@pytest.mark.parametrize('block,halo', [(4, 1), (8, 3), (4, 0)])
def test_interior_matches_timm_halo_attn(block, halo):
    """Where no window touches the border, our layer and timm's compute the same thing (relative offsets too)."""
    torch.manual_seed(5)
    layer = _randomize(HaloAttention(16, block_size=block, halo_size=halo, heads=2, dim_head=8), 6)
    twin = _timm_twin(layer)
    x = torch.randn(2, 16, 4 * block, 3 * block)
    with torch.no_grad():
        ours, theirs = layer(x), twin(x)
    if halo == 0:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    else:
        inner = (slice(None), slice(None), slice(block, 3 * block), slice(block, 2 * block))
        torch.testing.assert_close(ours[inner], theirs[inner], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours, theirs, atol=1e-4)  # and the borders differ, as they should


def test_lucidrains_constructor_form():
    layer = HaloAttention(dim=512, block_size=2, halo_size=1)
    assert (layer.heads, layer.dim_head) == (8, 64)
    x = torch.randn(1, 512, 6, 6)
    assert layer(x).shape == (1, 512, 6, 6)
    assert isinstance(layer.proj, torch.nn.Identity)
    narrow = HaloAttention(dim=32, block_size=4, halo_size=1, dim_head=16, heads=4)
    assert narrow(torch.randn(2, 32, 8, 8)).shape == (2, 32, 8, 8)  # 64 value channels projected back to 32
    assert isinstance(narrow.proj, torch.nn.Conv2d)


def test_stride2_and_halo0_shapes():
    layer = HaloAttention(16, block_size=4, halo_size=0, heads=2, dim_head=8, stride=2, dim_out=24)
    for H, W in [(8, 8), (7, 5), (1, 1), (2, 9)]:
        assert layer(torch.randn(2, 16, H, W)).shape == (2, 24, math.ceil(H / 2), math.ceil(W / 2))


def test_bf16_close_to_fp32_reference():
    torch.manual_seed(0)
    layer = HaloAttention(32, block_size=4, halo_size=2, heads=4, dim_head=8)
    x = torch.randn(2, 32, 10, 13)
    ref = layer.reference_forward(x)
    out = layer.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=0, atol=5e-2)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out_amp = layer.float()(x)
    torch.testing.assert_close(out_amp.float(), ref, rtol=0, atol=5e-2)


def test_torchscript_matches_eager():
    layer = HaloAttention(16, block_size=4, halo_size=1, heads=2, dim_head=8, stride=2).eval()
    scripted = torch.jit.script(layer)
    x = torch.randn(2, 16, 9, 7)
    torch.testing.assert_close(scripted(x), layer.reference_forward(x), rtol=0, atol=1e-5)


def test_meta_init_then_materialize():
    """Built on the meta device (as timm's create_model(..., device='meta') does), then materialised with
    to_empty() and loaded: the layer keeps no state beyond its parameters."""
    real = HaloAttention(16, block_size=4, halo_size=1, heads=2, dim_head=8, stride=2)
    meta = HaloAttention(16, block_size=4, halo_size=1, heads=2, dim_head=8, stride=2, device='meta')
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    meta = meta.to_empty(device='cpu')
    meta.load_state_dict(real.state_dict())
    x = torch.randn(1, 16, 9, 9)
    torch.testing.assert_close(meta(x), real(x))


@pytest.mark.parametrize('size,cropped_keys', [(8, 8 * 8), (16, 11 * 11), (13, 11 * 11), (24, 14 * 14), (5, 5 * 5)])
def test_small_maps_get_cropped_key_windows(size, cropped_keys):
    """Eager mode skips window rows/columns that lie outside the image on maps of one or two blocks per axis
    (HaloNet's late stages); compile/export keep the plain b + 2h windows. Both match the reference (above)."""
    layer = HaloAttention(16, block_size=8, halo_size=3, heads=2, dim_head=8)
    x = torch.randn(1, 16, size, size)
    with torch.no_grad():
        k_eager = layer._blocked(x, crop=True, gather_op=True)[1]
        k_plain = layer._blocked(x, crop=False, gather_op=False)[1]
        torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=0, atol=1e-5)
    assert k_eager.shape[-1] == cropped_keys
    assert k_plain.shape[-1] == 14 * 14


def test_custom_ops_pass_opcheck():
    """The CPU kernels are torch.library custom ops: schema, fake (meta) kernels and autograd registration are
    checked by torch's own op checker, with gradients flowing through every input."""
    from timm_halo.layers import attend_tiled, gather_windows
    from timm_halo.layers.windows import scatter_windows
    torch.manual_seed(0)
    layer = HaloAttention(8, block_size=4, halo_size=1, heads=2, dim_head=4, stride=2)
    x = torch.randn(2, 8, 10, 9)
    with torch.no_grad():
        q, k, v, (rel_h, rel_w), _ = layer._blocked(x, crop=True, gather_op=True)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, rel_h, rel_w)]
    torch.library.opcheck(attend_tiled, (*inputs, layer.scale, 300))  # 300 logits: several tiles
    padded = torch.randn(2, 16, 12, 11, requires_grad=True)
    torch.library.opcheck(gather_windows, (padded, 2, 4, 4, 6, 5, 6))
    grad_k, grad_v = (t.requires_grad_() for t in gather_windows(padded.detach(), 2, 4, 4, 6, 5, 6))
    torch.library.opcheck(scatter_windows, (grad_k, grad_v, [2, 16, 12, 11], 2, 4, 4, 6, 5, 6))


def test_compiled_graph_calls_the_cpu_kernels():
    """torch.compile runs the same kernels as eager mode (not the whole-tensor path), as single graph nodes."""
    layer = HaloAttention(16, block_size=4, halo_size=1, heads=2, dim_head=8, attn_impl='tiled')
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(layer, backend=record, fullgraph=True)(x)
    torch._dynamo.reset()
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes}
    assert {'timm_halo.attend_tiled.default', 'timm_halo.gather_windows.default'} <= targets, targets
    torch.testing.assert_close(out, layer.reference_forward(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize('geometry', [(4, 6, 5, 6), (3, 5, 2, 4), (8, 8, 8, 8), (5, 11, 5, 11)])
def test_plain_window_cut_equals_the_gather_op(geometry):
    """The plain-op window cut (exports, forward-mode AD: one gather of whole pixels) and the custom op (eager and
    compiled) cut the same windows, values and gradients."""
    from timm_halo.layers import gather_windows, unfold_windows
    padded = torch.randn(2, 2 * (4 + 3), 16, 21, dtype=torch.double, requires_grad=True)
    plain, op = unfold_windows(padded, 2, 4, *geometry), gather_windows(padded, 2, 4, *geometry)
    for a, b in zip(plain, op):
        assert torch.equal(a, b)
    weights = [torch.randn_like(t) for t in plain]
    grads = [torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, cut)), padded)[0] for cut in (plain, op)]
    torch.testing.assert_close(*grads, rtol=1e-12, atol=1e-12)  # overlapping windows: sums in another order
