"""attn_impl='sdpa', the kernel CUDA runs by default, through its own functions on CPU tensors.

tests/test_halo_attention.py already holds 'sdpa' (eager and plain windows) to the dense reference on small head
widths (4, 8). Here: HaloNet's head widths 8/16/32/64 at block 8 / halo 3 with odd sizes, one- and two-block
maps, stride 2 and value widths unlike the q/k width, in fp64 (outputs and the gradients of the input and every
parameter, rel_pos tables included), through each configuration the CUDA path uses: values padded for flash or
not, calls split into chunks of windows, CPU's fused flash kernel and the math backend forced in turn. Then the
call itself (no mask, backend-friendly widths, one dtype under autocast, finite masks after a downcast), what
``'auto'`` picks, double backward (works or raises, never wrong), torch.compile, and the CUDA call's shapes on fake
CUDA tensors (no GPU needed).
"""
import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from timm_halo import HaloAttention
from timm_halo.layers import fused_cpu
from timm_halo.layers import kernels as kernels_module
from timm_halo.layers import sdpa as sdpa_module
from timm_halo.layers.broadcast import attend_broadcast
from timm_halo.layers.kernels import Call, choose
from timm_halo.layers.sdpa import attend_sdpa, augment

# (channels, H, W, block, halo, stride, heads, dim_head, value_ratio)
CASES = {
    'w8 b8h3 odd 3x2 blocks': (64, 19, 13, 8, 3, 1, 8, 8, 1.0),
    'w16 b8h3 2x2 blocks stride 2': (32, 16, 16, 8, 3, 2, 2, 16, 1.0),
    'w32 b8h3 one block': (64, 8, 8, 8, 3, 1, 2, 32, 1.0),
    'w64 b8h3 odd 2x1 blocks stride 2': (128, 9, 7, 8, 3, 2, 2, 64, 1.0),
    'w8 v16 odd': (16, 11, 10, 4, 2, 1, 2, 8, 2.0),
    'w16 v8 odd stride 2': (32, 13, 9, 4, 1, 2, 2, 16, 0.5),
}

# How the layer's sdpa call is configured: the CUDA variants (v padded for flash or not, chunked windows) and the
# CPU backends forced one at a time (a config a forced backend cannot run raises instead of falling back).
VARIANTS = {
    'cpu flash': (dict(), [SDPBackend.FLASH_ATTENTION]),
    'math': (dict(), [SDPBackend.MATH]),
    'narrow v': (dict(pad_values=False), [SDPBackend.MATH]),
    'padded v, chunks of 5': (dict(pad_values=True, max_windows=5), [SDPBackend.FLASH_ATTENTION]),
    'narrow v, chunks of 7': (dict(pad_values=False, max_windows=7), [SDPBackend.MATH]),
}


def _layer(case, dtype=torch.double, seed: int = 0) -> HaloAttention:
    C, _, _, b, h, s, heads, dh, rv = case
    torch.manual_seed(seed)
    layer = HaloAttention(C, block_size=b, halo_size=h, heads=heads, dim_head=dh, stride=s, value_ratio=rv,
                          attn_impl='sdpa')
    with torch.no_grad():  # weights of order 1: peaked softmaxes, so wrong relative terms or masks show
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return layer.to(dtype)


class _SdpaSpy:
    """Records the arguments of every F.scaled_dot_product_attention call."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = F.scaled_dot_product_attention

        def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
            self.calls.append(SimpleNamespace(q=q, k=k, v=v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, kwargs=kwargs))
            return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

        monkeypatch.setattr(F, 'scaled_dot_product_attention', spy)


@pytest.mark.parametrize('variant', VARIANTS)
@pytest.mark.parametrize('case', CASES)
def test_outputs_and_gradients_match_reference_fp64(case, variant, monkeypatch):
    options, backends = VARIANTS[variant]
    monkeypatch.setattr(kernels_module, 'attend_sdpa', functools.partial(attend_sdpa, **options))
    spy = _SdpaSpy(monkeypatch)
    layer = _layer(CASES[case])
    C, H, W = CASES[case][:3]
    x = torch.randn(2, C, H, W, dtype=torch.double, requires_grad=True)
    with sdpa_kernel(backends):
        out = layer(x)
    ref = layer.reference_forward(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)

    grad_out = torch.randn_like(ref)
    names = ['x'] + [n for n, _ in layer.named_parameters()]
    inputs = [x] + list(layer.parameters())
    with sdpa_kernel(backends):
        grads = torch.autograd.grad((out * grad_out).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * grad_out).sum(), inputs)
    for name, g, g_ref in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9, msg=f'gradient of {name}')
    assert dict(zip(names, grads))['rel_pos_h'].abs().max() > 1e-3  # the tables do get a gradient

    assert spy.calls, 'the sdpa kernel did not run'
    windows = sum(call.q.shape[0] for call in spy.calls)
    limit = options.get('max_windows')
    if limit is not None:
        assert all(call.q.shape[0] <= limit for call in spy.calls) and len(spy.calls) == -(-windows // limit)


@pytest.mark.parametrize('pad_values', [True, False])
@pytest.mark.parametrize('case', ['w8 b8h3 odd 3x2 blocks', 'w64 b8h3 odd 2x1 blocks stride 2', 'w8 v16 odd'])
def test_the_call_suits_every_fused_backend(case, pad_values, monkeypatch):
    """No mask, 4-D (windows, 1 head, tokens, width), contiguous, q/k widths equal and multiples of 8, v as wide as
    q/k when padded for flash (else the next multiple of 8), scale 1 (already folded into q')."""
    monkeypatch.setattr(kernels_module, 'attend_sdpa', functools.partial(attend_sdpa, pad_values=pad_values))
    spy = _SdpaSpy(monkeypatch)
    layer = _layer(CASES[case], torch.float32)
    C, H, W = CASES[case][:3]
    with torch.no_grad():
        layer(torch.randn(3, C, H, W))
    (call,) = spy.calls
    q, k, v = call.q, call.k, call.v
    assert call.attn_mask is None and not call.is_causal and call.dropout_p == 0 and call.kwargs == {'scale': 1.0}
    assert q.dim() == k.dim() == v.dim() == 4 and q.shape[1] == k.shape[1] == v.shape[1] == 1
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in (q, k, v))
    assert q.shape[-1] == k.shape[-1] and q.shape[-1] % 8 == 0 and v.shape[-1] % 8 == 0
    dv = layer.dim_head_v
    assert v.shape[-1] == (q.shape[-1] if pad_values else dv + (-dv) % 8)


def _window_inputs(n=6, d=8, dv=16, bq=4, kh=7, kw=6, dtype=torch.float32, seed=0):
    """Random attend_* inputs with a border mask in some key rows/columns (as _axis_terms makes it)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, c, m, generator=g).to(dtype) for c, m in ((d, bq * bq), (d, kh * kw), (dv, kh * kw)))
    rel_h = torch.randn(n, bq, bq, kh, generator=g).to(dtype)
    rel_w = torch.randn(n, bq, bq, kw, generator=g).to(dtype)
    masked = torch.finfo(dtype).min / 4
    rel_h[..., :2] = masked
    rel_w[..., -1] = masked
    return q, k, v, rel_h, rel_w


@pytest.mark.parametrize('n,limit', [(12, 4), (13, 4), (65, 64), (5, 5)])
def test_chunked_calls_equal_one_call(n, limit, monkeypatch):
    """As few calls as fit, of nearly equal sizes (13 windows, at most 4 a call: 4, 3, 3, 3), and the same result."""
    args = _window_inputs(n=n, dtype=torch.double)
    whole = attend_sdpa(*args, 0.3)
    spy = _SdpaSpy(monkeypatch)
    torch.testing.assert_close(attend_sdpa(*args, 0.3, max_windows=limit), whole, rtol=0, atol=1e-12)
    sizes = [call.q.shape[0] for call in spy.calls]
    assert len(sizes) == -(-n // limit) and max(sizes) <= limit and max(sizes) - min(sizes) <= 1, sizes
    torch.testing.assert_close(whole, attend_broadcast(*args, 0.3), rtol=1e-10, atol=1e-10)


def test_autocast_gives_one_dtype_and_finite_masks(monkeypatch):
    """Under autocast the layer's q and relative terms can arrive in different dtypes (fp32 tables, bf16 q): q',
    k', v' are all in the autocast dtype (torch.cat would otherwise promote them to fp32). A fp32 border mask cast
    to fp16 would round to -inf, and -inf times a zero of the one-hot keys is NaN: it saturates instead."""
    spy = _SdpaSpy(monkeypatch)
    q, k, v, rel_h, rel_w = _window_inputs()
    expected = attend_broadcast(q, k, v, rel_h, rel_w, 0.35)
    for dtype in (torch.bfloat16, torch.float16):
        spy.calls.clear()
        with torch.autocast('cpu', dtype=dtype):
            out = attend_sdpa(q.to(dtype), k, v.to(dtype), rel_h, rel_w, 0.35)
        (call,) = spy.calls
        assert {call.q.dtype, call.k.dtype, call.v.dtype} == {dtype}
        assert torch.isfinite(call.q).all() and out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), expected, rtol=0, atol=3e-2 * expected.abs().max().item())
    q_aug = augment(q, k, v, rel_h, rel_w, 0.35)[0]
    assert q_aug.dtype == torch.float32  # no autocast: the inputs' dtype
    fp16_mask = sdpa_module._logits_to(torch.tensor([torch.finfo(torch.float32).min / 4, 1.5]), torch.float16)
    assert fp16_mask.tolist() == [-torch.finfo(torch.float16).max / 4, 1.5]


def test_fp64_is_left_alone_by_autocast():
    args = _window_inputs(dtype=torch.double)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = attend_sdpa(*args, 0.5)
    assert out.dtype == torch.double
    torch.testing.assert_close(out, attend_broadcast(*args, 0.5), rtol=1e-10, atol=1e-10)


def test_value_padding_defaults(monkeypatch):
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    assert sdpa_module._pad_values_default(cpu, torch.float32)  # CPU flash needs equal widths
    # CUDA: narrow values (SDPA picks cuDNN either way on an H100); the switch brings flash's padding back for
    # fp16/bf16 only, as CUDA has no fp32 flash kernel
    assert not any(sdpa_module._pad_values_default(cuda, t) for t in (torch.float16, torch.bfloat16, torch.float))
    monkeypatch.setattr(sdpa_module, 'CUDA_PAD_VALUES_FOR_FLASH', True)
    assert sdpa_module._pad_values_default(cuda, torch.bfloat16) and sdpa_module._pad_values_default(
        cuda, torch.float16)
    assert not sdpa_module._pad_values_default(cuda, torch.float32)


def test_double_backward_works_or_raises_never_wrong():
    """PyTorch's fused SDPA backward kernels have no derivative: a second backward through them raises. The math
    backend is differentiable to any order and matches the reference there."""
    layer = _layer((8, 0, 0, 4, 1, 1, 2, 8, 1.0))
    x = torch.randn(1, 8, 7, 6, dtype=torch.double, requires_grad=True)

    def penalty(forward, backends):
        with sdpa_kernel(backends):
            grad_x, = torch.autograd.grad(forward(x).square().sum(), x, create_graph=True)
            return torch.autograd.grad(grad_x.square().sum(), [x, layer.rel_pos_h])

    ref = penalty(layer.reference_forward, [SDPBackend.MATH])
    for got, expected in zip(penalty(layer, [SDPBackend.MATH]), ref):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-9)
    with pytest.raises(RuntimeError, match=r'derivative for .*scaled_dot_product.* is not implemented'):
        penalty(layer, [SDPBackend.FLASH_ATTENTION])


def _call(device: str, dtype=torch.float32, traced=False, plain_autograd=False) -> Call:
    return Call(device, dtype, traced, plain_autograd, logits=1 << 24)


def test_auto_picks_sdpa_on_cuda_where_it_can_run():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert choose('auto', _call('cuda', dtype)) == 'sdpa'
        # forward-mode AD / torch.func, tracing / export: plain ops
        assert choose('auto', _call('cuda', dtype, plain_autograd=True)) == 'broadcast'
        assert choose('auto', _call('cuda', dtype, traced=True)) == 'broadcast'
    assert choose('auto', _call('cuda', torch.float64)) == 'broadcast'  # no fused fp64 kernel
    assert choose('auto', _call('mps')) == 'broadcast'
    assert choose('auto', _call('cpu')) == ('fused' if fused_cpu.preferred() else 'tiled')
    assert choose('sdpa', _call('cpu', torch.float64)) == 'sdpa'  # explicit: any device and dtype


def test_compile_traces_the_sdpa_path_in_one_graph():
    """Dynamo takes the whole layer, autocast queries and chunking decisions included, as one graph (fullgraph);
    aot_eager runs its forward and backward as traced."""
    layer = _layer(CASES['w16 b8h3 2x2 blocks stride 2'], torch.float32)
    x = torch.randn(2, 32, 16, 16, requires_grad=True)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(layer, backend='aot_eager', fullgraph=True)
        for amp in (False, True):
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
                out = compiled(x)
                ref = layer(x)
            assert out.dtype == ref.dtype
            grad, = torch.autograd.grad(out.float().sum(), x)
            grad_ref, = torch.autograd.grad(ref.float().sum(), x)
            tol = 3e-2 * ref.float().abs().max().item() if amp else 1e-5
            torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=tol)
            torch.testing.assert_close(grad, grad_ref, rtol=0, atol=tol * 10 if amp else 1e-4)
    finally:
        torch._dynamo.reset()


# ---- the CUDA call on fake CUDA tensors (shapes and dtypes only, no GPU) --------------------------------------------

@pytest.fixture
def fake_cuda():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    try:
        with mode:
            torch.empty(1, device='cuda')
    except Exception as e:  # a torch built without CUDA cannot even fake it
        pytest.skip(f'fake CUDA tensors unavailable: {e}')
    return mode


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('batch,channels,size,calls', [
    (2, 64, 64, 1),       # H1 stage 1, head width 8: 1024 windows
    (128, 64, 64, 2),     # the same at batch 128: 65536 windows, one more than a CUDA call takes
    (3, 512, 8, 1),       # H1 stage 4 (one block, cropped 8x8 windows), head width 64
])
def test_cuda_call_shapes_on_fake_tensors(fake_cuda, monkeypatch, dtype, batch, channels, size, calls):
    spy = _SdpaSpy(monkeypatch)
    with fake_cuda:
        layer = HaloAttention(channels, block_size=8, halo_size=3, heads=8, dim_head=channels // 8, device='cuda',
                              dtype=dtype)
        out = layer(torch.randn(batch, channels, size, size, device='cuda', dtype=dtype))
    assert out.shape == (batch, channels, size, size) and out.device.type == 'cuda'
    assert len(spy.calls) == calls, 'auto must run sdpa on CUDA, in chunks of at most 65535 windows'
    assert sum(c.q.shape[0] for c in spy.calls) == batch * 8 * (size // 8) ** 2
    for c in spy.calls:
        q, k, v = c.q, c.k, c.v
        assert c.attn_mask is None and q.shape[0] <= sdpa_module.CUDA_MAX_WINDOWS_PER_CALL and q.shape[1] == 1
        assert {q.dtype, k.dtype, v.dtype} == {dtype} and all(t.is_contiguous() for t in (q, k, v))
        assert q.shape[-1] == k.shape[-1] and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
        dv = channels // 8
        # v at its own width, padded to a multiple of 8 (cuDNN / memory-efficient attention)
        assert v.shape[-1] == dv + (-dv) % 8
