"""Mixed precision and numerics: reduced-precision autocast against the fp32 reference, masking, determinism."""
import pytest
import timm
import torch

import timm_halo  # noqa: F401  (registers the halonet_* models with timm)
from timm_halo import HaloAttention
from timm_halo.layers import fused_cpu

# Maps where some query's window is all padding but one pixel (1x1, 1xN, Nx1) next to an ordinary one.
SHAPES = [(2, 10, 13), (1, 1, 1), (1, 1, 9), (2, 5, 1)]
# bf16 keeps 8 significant bits: a few roundings per output give errors of about 1% of the output's scale.
BF16_TOL = 3e-2


def _layer(stride: int, seed: int = 0) -> HaloAttention:
    torch.manual_seed(seed)
    # dim_out equals the value width: no output projection, so the output is the attention average itself
    return HaloAttention(32, block_size=4, halo_size=2, heads=4, dim_head=8, stride=stride, dim_out=32).eval()


def _run(layer: HaloAttention, x: torch.Tensor, path: str, device_type: str, dtype: torch.dtype) -> torch.Tensor:
    """Forward under autocast through one kernel of the implementation table."""
    layer.attn_impl = path
    try:
        with torch.no_grad(), torch.autocast(device_type, dtype=dtype):
            return layer(x)
    finally:
        layer.attn_impl = 'auto'


def _value_range(layer: HaloAttention, x: torch.Tensor):
    """Per (batch, output channel) min and max of the values: a softmax average must stay inside them."""
    d, dv = layer.dim_head, layer.dim_head_v
    with torch.no_grad():
        kv = layer.kv(x).unflatten(1, (layer.heads, d + dv))[:, :, d:].flatten(1, 2)  # B, heads * dv, H, W
    return kv.amin(dim=(2, 3)), kv.amax(dim=(2, 3))


@pytest.mark.parametrize('stride', [1, 2])
def test_bf16_autocast_matches_fp32_reference(stride, kernel):
    layer = _layer(stride)
    for shape in SHAPES:
        x = torch.randn(shape[0], 32, *shape[1:])
        ref = layer.reference_forward(x).detach()
        out = _run(layer, x, kernel, 'cpu', torch.bfloat16)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all(), shape
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=BF16_TOL * ref.abs().max().item(), msg=str(shape))


@pytest.mark.parametrize('stride', [1, 2])
def test_bf16_autocast_large_inputs_stay_finite_and_bounded(stride, kernel):
    """Inputs scaled by 1e3 give logits of about 1e6, where bf16's 3 significant digits can change which key a
    query attends to: a pointwise comparison with fp32 is meaningless there (the problem is ill-conditioned,
    not the kernel). What must hold: no NaN/inf, and every output inside the range of the values it averages.
    Where the answer does not depend on the softmax (a single visible key, or a constant image) it must
    still match the fp32 reference."""
    layer = _layer(stride)
    for shape in SHAPES:
        x = torch.randn(shape[0], 32, *shape[1:]) * 1e3
        out = _run(layer, x, kernel, 'cpu', torch.bfloat16).float()
        assert torch.isfinite(out).all(), shape
        low, high = _value_range(layer, x)
        # bf16 rounding of the projections is relative to their scale, not to each (possibly cancelled) value
        slack = BF16_TOL * torch.maximum(low.abs(), high.abs()).max()
        assert (out >= (low - slack)[..., None, None]).all() and (out <= (high + slack)[..., None, None]).all()
        if shape[1:] == (1, 1):
            ref = layer.reference_forward(x).detach()
            torch.testing.assert_close(out, ref, rtol=0, atol=BF16_TOL * ref.abs().max().item())
    for value in (0.0, 1.0, -1e3, 1e3):
        x = torch.full((1, 32, 7, 9), value)
        ref = layer.reference_forward(x).detach()
        out = _run(layer, x, kernel, 'cpu', torch.bfloat16).float()
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, rtol=0, atol=BF16_TOL * max(ref.abs().max().item(), 1e-3))


def test_masked_positions_get_exactly_zero_weight_in_bf16():
    """A 1x1 map sees one real pixel in a 8x8 window of padding: its output must be that pixel's value
    projection, i.e. the padding's weight is 0 even after bf16 rounding of the mask (not merely small)."""
    layer = _layer(1)
    x = torch.randn(3, 32, 1, 1) * 50
    with torch.no_grad():
        v = layer.kv(x).unflatten(1, (layer.heads, 2 * layer.dim_head))[:, :, layer.dim_head:].flatten(1, 2)
        for path in ('fused', 'tiled', 'broadcast')[0 if fused_cpu.available() else 1:]:
            out = _run(layer, x, path, 'cpu', torch.bfloat16).float()
            with torch.autocast('cpu', dtype=torch.bfloat16):
                v_bf16 = layer.kv(x).unflatten(1, (layer.heads, 2 * layer.dim_head))[:, :, layer.dim_head:]
            torch.testing.assert_close(out, v_bf16.flatten(1, 2).float(), rtol=0, atol=0)  # exact: weight 1
            torch.testing.assert_close(out, v, rtol=0, atol=BF16_TOL * v.abs().max().item())


def test_mask_value_is_dtype_safe():
    """Two masks (row + column) plus a large logit stay finite in every float dtype."""
    layer = _layer(1)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        plan = layer._window_plan(5, 2, crop=False)  # 5 pixels in 2 blocks: padded windows, masked slots
        _, mask = layer._axis_terms(5, 2, plan, dtype, torch.device('cpu'))
        lowest = torch.finfo(dtype).min
        assert mask.min().item() == pytest.approx(lowest / 4, rel=1e-3) and mask.max().item() == 0
        worst = mask.min() + mask.min() + torch.tensor(lowest / 4, dtype=dtype)
        assert torch.isfinite(worst)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='fp16 autocast is tested on CUDA only (none here)')
@pytest.mark.parametrize('stride', [1, 2])
def test_fp16_autocast_cuda(stride):
    """fp16's largest value is 65504: logits of activations much beyond 1e2 overflow in any fp16 attention, so
    the large-input check is bf16's (same range as fp32). Ordinary, constant and tiny masked maps must work."""
    layer = _layer(stride).cuda()
    for shape in SHAPES:
        x = torch.randn(shape[0], 32, *shape[1:], device='cuda')
        ref = layer.reference_forward(x).detach()
        for path in ('sdpa', 'broadcast'):  # the kernels that run on CUDA
            out = _run(layer, x, path, 'cuda', torch.float16)
            assert out.dtype == torch.float16 and torch.isfinite(out).all(), shape
            torch.testing.assert_close(out.float(), ref, rtol=0, atol=1e-2 * ref.abs().max().item())
    x = torch.full((1, 32, 7, 9), 3.0, device='cuda')
    ref = layer.reference_forward(x).detach()
    torch.testing.assert_close(_run(layer, x, 'auto', 'cuda', torch.float16).float(), ref, rtol=0,
                               atol=1e-2 * ref.abs().max().item())


def _small_model(**kwargs) -> torch.nn.Module:
    return timm.create_model(
        'halonet_h0', depths=(1, 1, 1, 1), widths=(16, 32, 64, 64), stem_chs=16, block_size=4, halo_size=1,
        heads=2, num_classes=10, zero_init_last=False, **kwargs).eval()


def test_model_bf16_autocast_large_and_constant_inputs_stay_finite():
    torch.manual_seed(0)
    model = _small_model()
    inputs = {
        'randn * 1e3': torch.randn(2, 3, 40, 36) * 1e3,
        'zeros': torch.zeros(2, 3, 40, 36),
        'constant 1e3': torch.full((2, 3, 40, 36), 1e3),
        '1x1 image * 1e3': torch.randn(2, 3, 1, 1) * 1e3,
        '1xN image': torch.randn(2, 3, 1, 37),
    }
    for name, x in inputs.items():
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            logits = model(x)
            feats = model.forward_intermediates(x, intermediates_only=True)
        assert torch.isfinite(logits).all(), name
        assert all(torch.isfinite(f).all() for f in feats), name
    x = inputs['zeros']
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            amp = model(x)
    # a constant image: every attention layer averages identical values, so bf16 only adds rounding
    torch.testing.assert_close(amp.float(), ref, rtol=0, atol=BF16_TOL * ref.abs().max().item())


def test_same_seed_same_output():
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = _small_model(drop_path_rate=0.1, drop_rate=0.1)
        x = torch.randn(2, 3, 33, 40)
        model.train()  # dropout and drop-path draw from the seeded generator too
        outputs.append(model(x))
        model.eval()
        with torch.no_grad():
            outputs.append(model(x))
    torch.testing.assert_close(outputs[0], outputs[2], rtol=0, atol=0)
    torch.testing.assert_close(outputs[1], outputs[3], rtol=0, atol=0)
    assert not torch.equal(outputs[0], outputs[1])  # train mode really was stochastic


def test_deterministic_algorithms_mode_runs_forward_and_backward():
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(0)
        model = _small_model().train()
        x = torch.randn(2, 3, 33, 40)
        grads = []
        for _ in range(2):
            model.zero_grad()
            model(x).logsumexp(-1).sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        layer = _layer(2)
        xl = torch.randn(1, 32, 9, 7, requires_grad=True)
        layer(xl).sum().backward()
        assert torch.isfinite(xl.grad).all()
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    assert torch.are_deterministic_algorithms_enabled() == enabled
