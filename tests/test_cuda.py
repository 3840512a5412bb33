"""CUDA only (skipped without a GPU): the fused 'sdpa' path on the GPU.

Each SDPA backend is forced alone (``sdpa_kernel([backend])``, math disabled), so a configuration the backend
cannot take raises instead of silently falling back; a failure names the backend's own reasons
(``torch.backends.cuda.can_use_*_attention(..., debug=True)``). References are fp64 on the GPU: the dense
``reference_forward`` on small maps, and the whole-tensor 'broadcast' kernel (held to the dense reference in fp64
by the CPU tests) on HaloNet-H1's full stage shapes, where the dense reference would need tens of GB.

    pytest tests/test_cuda.py        # or: bash benchmarks/gpu_check.sh
"""
import contextlib
import copy
import warnings

import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import timm_halo  # noqa: F401  (registers the halonet_* models with timm)
from timm_halo import HaloAttention
from timm_halo.layers import kernels as kernels_module
from timm_halo.layers import sdpa as sdpa_module

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

BACKENDS = {
    'flash': SDPBackend.FLASH_ATTENTION,
    'efficient': SDPBackend.EFFICIENT_ATTENTION,
    'cudnn': SDPBackend.CUDNN_ATTENTION,
}
CAN_USE = {
    'flash': 'can_use_flash_attention',
    'efficient': 'can_use_efficient_attention',
    'cudnn': 'can_use_cudnn_attention',
}
# HaloNet-H1's attention layers (block 8, halo 3, 8 heads of C/8) at batch 2: name -> (channels, (H, W), stride)
STAGES = {
    'stage1 C64 64x64': (64, (64, 64), 1),
    'stage2-entry C128 64x64 s2': (128, (64, 64), 2),
    'stage3 C256 16x16': (256, (16, 16), 1),
    'stage4 C512 8x8': (512, (8, 8), 1),
    'odd C64 23x17 s2': (64, (23, 17), 2),
}
# Tolerances relative to the reference's largest magnitude: bf16 keeps 8 significant bits, fp16 11.
AMP_TOL = {torch.bfloat16: 3e-2, torch.float16: 1e-2}
GRAD_TOL = {torch.bfloat16: 5e-2, torch.float16: 2e-2}  # relative Frobenius error of a gradient


@pytest.fixture(autouse=True)
def _full_fp32():
    """No TF32 in convolutions or matmuls: fp32 results are compared at 1e-4."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _layer(channels: int, stride: int, seed: int = 0, **kwargs) -> HaloAttention:
    torch.manual_seed(seed)
    kwargs = dict(dict(block_size=8, halo_size=3, heads=8, dim_head=channels // 8), **kwargs)
    return HaloAttention(channels, stride=stride, attn_impl='sdpa', **kwargs).cuda()


def _input(channels: int, size, batch: int = 2, seed: int = 1) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator(device='cuda').manual_seed(seed)
    return torch.randn(batch, channels, h, w, device='cuda', generator=g)


def _run(layer, x, impl='sdpa', amp=None, backends=None, grad_out=None, params=('rel_pos_h', 'rel_pos_w')):
    """Output and gradients (x, the named parameters) of one forward/backward through one kernel."""
    layer.attn_impl = impl
    x = x.detach().requires_grad_()
    named = dict(layer.named_parameters())
    ctx = sdpa_kernel(backends) if backends is not None else contextlib.nullcontext()
    with ctx, torch.autocast('cuda', dtype=amp or torch.float32, enabled=amp is not None):
        out = layer(x)
    grads = torch.autograd.grad(out.float(), [x] + [named[p] for p in params],
                                grad_out if grad_out is not None else torch.ones_like(out, dtype=torch.float32))
    return out.float(), grads


def _reference(layer, x, grad_out=None, params=('rel_pos_h', 'rel_pos_w')):
    """fp64 on the GPU through the whole-tensor kernel (tested against the dense reference in fp64 on CPU)."""
    ref = copy.deepcopy(layer).double()
    out, grads = _run(ref, x.double(), 'broadcast', grad_out=None if grad_out is None else grad_out.double(),
                      params=params)
    return out.float(), [g.float() for g in grads]


def _why_not(backend: str, call) -> str:
    """The backend's own reasons for refusing the recorded SDPA call."""
    params = torch.backends.cuda.SDPAParams(call[0], call[1], call[2], None, 0.0, False, False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        ok = getattr(torch.backends.cuda, CAN_USE[backend])(params, True)
    shapes = ' '.join(f'{tuple(t.shape)}:{t.dtype}' for t in call[:3])
    reasons = '; '.join(str(w.message) for w in caught) or "PyTorch's reasons are on the captured stderr"
    return f'{backend} eligible={ok} for q/k/v {shapes}: {reasons}'


def _forced(backend, layer, x, amp, **kwargs):
    """_run with only ``backend`` enabled; a refusal fails the test with the backend's reasons."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kw):
        seen.append((q, k, v))
        return real(q, k, v, *args, **kw)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        return _run(layer, x, amp=amp, backends=[BACKENDS[backend]], **kwargs)
    except RuntimeError as e:
        if not seen:
            raise
        pytest.fail(f'{e}\n{_why_not(backend, seen[-1])}')
    finally:
        torch.nn.functional.scaled_dot_product_attention = real


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check(out, grads, ref_out, ref_grads, tol, grad_tol, what):
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads), what
    err = (out - ref_out).abs().max().item() / ref_out.abs().max().item()
    assert err <= tol, f'{what}: output error {err:.2e} (max abs, relative to the largest output) > {tol:.0e}'
    for name, g, g_ref in zip(('x', 'rel_pos_h', 'rel_pos_w'), grads, ref_grads):
        e = _rel_err(g, g_ref)
        assert e <= grad_tol, f'{what}: gradient of {name} off by {e:.2e} (relative norm) > {grad_tol:.0e}'


# ---- each backend forced alone -------------------------------------------------------------------------------------

@pytest.mark.parametrize('stage', STAGES)
@pytest.mark.parametrize('amp', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
@pytest.mark.parametrize('backend', BACKENDS)
def test_each_backend_forced_alone_autocast(backend, amp, stage):
    channels, size, stride = STAGES[stage]
    layer, x = _layer(channels, stride), _input(channels, size)
    ref_out, ref_grads = _reference(layer, x)
    out, grads = _forced(backend, layer, x, amp)
    _check(out, grads, ref_out, ref_grads, AMP_TOL[amp], GRAD_TOL[amp], f'{backend} {amp} {stage}')


@pytest.mark.parametrize('stage', STAGES)
def test_efficient_backend_fp32_within_1e4(stage):
    """fp32 has no flash or cuDNN kernel; the memory-efficient one runs it, v at its own width."""
    channels, size, stride = STAGES[stage]
    layer, x = _layer(channels, stride), _input(channels, size)
    ref_out, ref_grads = _reference(layer, x)
    out, grads = _forced('efficient', layer, x, None)
    _check(out, grads, ref_out, ref_grads, 1e-4, 1e-4, f'efficient fp32 {stage}')


@pytest.mark.parametrize('pad_values', [True, False], ids=['v padded', 'v narrow'])
@pytest.mark.parametrize('backend', ['efficient', 'cudnn'])
def test_value_width_variants(backend, pad_values, monkeypatch):
    """Both value layouts benchmarks/gpu.py compares, on the backends that take both."""
    monkeypatch.setattr(sdpa_module, 'CUDA_PAD_VALUES_FOR_FLASH', pad_values)
    layer, x = _layer(64, 1), _input(64, 32)
    ref_out, ref_grads = _reference(layer, x)
    out, grads = _forced(backend, layer, x, torch.bfloat16)
    _check(out, grads, ref_out, ref_grads, AMP_TOL[torch.bfloat16], GRAD_TOL[torch.bfloat16], backend)


@pytest.mark.parametrize('backend', BACKENDS)
def test_more_windows_than_a_cuda_grid_holds(backend):
    """73728 windows: more than the 65535 a CUDA grid dimension (and cuDNN's batch) holds, so the layer splits the
    call; each backend runs it."""
    layer = HaloAttention(16, block_size=2, halo_size=1, heads=8, dim_head=2).cuda()
    x = _input(16, 64, batch=9)
    ref_out, ref_grads = _reference(layer, x)
    out, grads = _forced(backend, layer, x, torch.bfloat16)
    _check(out, grads, ref_out, ref_grads, AMP_TOL[torch.bfloat16], GRAD_TOL[torch.bfloat16], backend)


# ---- defaults, the dense reference, compile, extremes ----------------------------------------------------------------

def test_auto_runs_sdpa_on_cuda_and_broadcast_in_fp64(monkeypatch):
    ran = []
    real = kernels_module.attend_sdpa
    monkeypatch.setattr(kernels_module, 'attend_sdpa', lambda *a, **k: ran.append(a[0].dtype) or real(*a, **k))
    layer = HaloAttention(64, block_size=8, halo_size=3, heads=8, dim_head=8).cuda()
    x = _input(64, 24)
    with torch.no_grad():
        layer(x)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            layer(x)
        layer.double()(x.double())
    assert ran == [torch.float32, torch.bfloat16]


@pytest.mark.parametrize('size,stride', [((19, 13), 1), ((16, 16), 2), ((8, 8), 1)])
def test_fp32_default_backend_matches_dense_reference(size, stride):
    torch.manual_seed(0)
    layer = HaloAttention(64, block_size=8, halo_size=3, heads=8, dim_head=8, stride=stride, value_ratio=2.0).cuda()
    x = _input(64, size)
    out, grads = _run(layer, x, 'auto', params=('rel_pos_h', 'rel_pos_w'))
    ref = copy.deepcopy(layer).double()
    xr = x.double().requires_grad_()
    ref_out = ref.reference_forward(xr)
    ref_grads = torch.autograd.grad(ref_out, [xr, ref.rel_pos_h, ref.rel_pos_w], torch.ones_like(ref_out))
    _check(out, grads, ref_out.float(), [g.float() for g in ref_grads], 1e-4, 1e-4, 'fp32 auto vs dense reference')


@pytest.mark.parametrize('amp', [None, torch.bfloat16], ids=['fp32', 'bf16'])
def test_torch_compile_matches_eager(amp):
    layer, x = _layer(128, 1), _input(128, 32)
    eager_out, eager_grads = _run(layer, x, amp=amp)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(layer, dynamic=False)
        x2 = x.detach().requires_grad_()
        with torch.autocast('cuda', dtype=amp or torch.float32, enabled=amp is not None):
            out = compiled(x2)
        grads = torch.autograd.grad(out.float(), [x2, layer.rel_pos_h, layer.rel_pos_w], torch.ones_like(out).float())
    finally:
        torch._dynamo.reset()
    tol = 1e-4 if amp is None else AMP_TOL[amp]
    _check(out.float(), grads, eager_out, eager_grads, tol, tol if amp is None else GRAD_TOL[amp], 'compiled')


@pytest.mark.parametrize('backend', BACKENDS)
def test_bf16_large_inputs_no_nan(backend):
    """Inputs scaled by 1e3 (logits about 1e6) next to the border mask: finite outputs and gradients, each output
    inside the range of the values it averages (bf16 can change which key wins, so no pointwise comparison)."""
    layer, x = _layer(64, 1), _input(64, (21, 30)) * 1e3
    out, grads = _forced(backend, layer, x, torch.bfloat16)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    d = layer.dim_head
    with torch.no_grad():
        v = layer.kv(x).unflatten(1, (layer.heads, 2 * d))[:, :, d:].flatten(1, 2)
    low, high = v.amin(dim=(2, 3)), v.amax(dim=(2, 3))
    slack = 3e-2 * torch.maximum(low.abs(), high.abs()).max()
    assert (out >= (low - slack)[..., None, None]).all() and (out <= (high + slack)[..., None, None]).all()


def test_double_backward_raises_through_fused_kernels_and_works_in_fp64():
    """PyTorch's fused backward kernels have no derivative: a gradient penalty through them is an error, not a wrong
    value. fp64 runs SDPA's math backend, differentiable to any order; attn_impl='broadcast' always is."""
    layer = _layer(16, 1, dim_head=4, heads=4)
    x = _input(16, (12, 10)).requires_grad_()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        grad_x, = torch.autograd.grad(layer(x).float().square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r'derivative for .* is not implemented'):
        torch.autograd.grad(grad_x.square().sum(), x)

    layer = layer.double()
    xd = x.detach().double().requires_grad_()
    results = []
    for forward in (layer, layer.reference_forward):
        gx, = torch.autograd.grad(forward(xd).square().sum(), xd, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), [xd, layer.rel_pos_h]))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-9)


def test_halonet_h1_bf16_channels_last_forward_backward():
    """The whole model as it trains: bf16 autocast, channels-last, fwd + bwd. Finite everywhere, and the logits
    agree with the whole-tensor kernel's in the same precision."""
    torch.manual_seed(0)
    model = timm.create_model('halonet_h1', num_classes=100).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 256, 256, device='cuda').to(memory_format=torch.channels_last)
    target = torch.randint(0, 100, (4,), device='cuda')
    logits = {}
    for impl in ('sdpa', 'broadcast'):
        for m in model.modules():
            if isinstance(m, HaloAttention):
                m.attn_impl = impl
        model.zero_grad(set_to_none=True)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out = model(x)
            loss = torch.nn.functional.cross_entropy(out.float(), target)
        loss.backward()
        assert torch.isfinite(loss), impl
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), impl
        logits[impl] = out.float()
    cos = torch.nn.functional.cosine_similarity(logits['sdpa'].flatten(), logits['broadcast'].flatten(), dim=0)
    assert cos > 0.99, cos
