"""Blocked local self-attention with a halo (HaloNet).

Paper: `Scaling Local Self-Attention for Parameter Efficient Visual Backbones`
    - https://arxiv.org/abs/2103.12731 (Vaswani et al., CVPR 2021)

Queries are grouped in non-overlapping ``block_size`` x ``block_size`` blocks. Every query of a block
attends to the ``(block_size + 2 * halo_size)`` square window centred on its block. Logits are

    scale * q . k  +  q . rel_pos_h[dy]  +  q . rel_pos_w[dx]

where ``(dy, dx)`` is the key's position minus the query's position, in input pixels. Window positions
that fall outside the image (the border halo, and the padding added when H or W is not a multiple of
the block size) are masked: they get exactly zero attention probability.

With ``stride=2`` the queries of each block are subsampled (every other row and column), keys and values
come from the full-resolution window, and the output has ``ceil(H / 2) x ceil(W / 2)`` pixels.

Three implementations share the parameters:

* ``forward`` on CPU, in eager mode and under ``torch.compile``, runs a tiled, flash-attention style kernel
  (the custom op ``attend_tiled``): the (blocks, b^2, w^2) logits are built tile by tile in one reused buffer so
  they stay in cache, and the backward pass recomputes them instead of storing them. Operands are
  channels-first per window (d x keys).
* On accelerators, under TorchScript and while tracing or exporting it runs the same maths on whole tensors
  (``attend_broadcast``): one logits tensor, the relative terms added by broadcasting.
* ``reference_forward`` is dense attention over every pixel with an explicit window mask and explicit
  relative offsets. It is slow and obviously correct; the tests hold the fast paths to it.

Outside TorchScript, tracing and export, maps of one or two blocks per axis get key windows cropped to the image
(``_window_plan``), and the window gather is an op with a strided-add backward (``gather_windows``). Exported
graphs hold plain ATen ops and plain windows: no custom ops to ship, and no size-dependent branches.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import register_notrace_function, register_notrace_module, trunc_normal_
from torch import nn

__all__ = ['HaloAttention', 'attend_broadcast', 'attend_tiled', 'check_image_input', 'gather_windows']

# Most logits per tile in the tiled CPU kernel (4 MB in fp32): small enough to stay in the cache, large enough
# that the per-tile overhead (about 15 small parallel ops) is negligible. Tuned on a 2-core x86 VM: a quarter
# of it costs 13% at HaloNet's stage-1 shape, 2x costs 3%.
_TILE_LOGITS = 1 << 20


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device_type argument
        return torch.is_autocast_cpu_enabled() if device_type == 'cpu' else torch.is_autocast_enabled()
    except RuntimeError:  # a device autocast does not know (e.g. meta): no autocast there
        return False


@torch.jit.unused
def _check_dtype(x: torch.Tensor, param_dtype: torch.dtype, owner: str) -> None:
    # PyTorch reports this deep inside a convolution ("expected scalar type Double but found Float"); name the
    # module and both dtypes instead. Under autocast a mismatch is the normal case (bf16 activations meet fp32
    # parameters), so only complain outside it.
    if x.dtype != param_dtype and not _autocast_enabled(x.device.type):
        raise TypeError(
            f'{owner} got a {x.dtype} input but its parameters are {param_dtype}: convert the input '
            f'(x.to({param_dtype})) or the module (.to({x.dtype})), or run under torch.autocast')


@register_notrace_function  # a leaf for torch.fx: the checks need real shapes, not proxies
def check_image_input(x: torch.Tensor, channels: int, param_dtype: torch.dtype, owner: str) -> None:
    """Raise a clear error unless ``x`` is a 4-D NCHW floating point tensor with ``channels`` channels whose
    dtype matches the parameters' (``param_dtype``; any dtype under autocast)."""
    if x.dim() != 4:
        raise ValueError(f'{owner} expects a 4-D NCHW tensor, got {x.dim()}-D of shape {list(x.shape)}')
    if x.shape[1] != channels:
        raise ValueError(
            f'{owner} was built for {channels} input channels, got {x.shape[1]} (input shape {list(x.shape)})')
    if x.shape[2] == 0 or x.shape[3] == 0:  # else a conv complains that its kernel exceeds the padded input
        raise ValueError(f'{owner} needs a non-empty image, got H x W = {x.shape[2]} x {x.shape[3]}')
    if not x.is_floating_point():
        raise TypeError(f'{owner} expects a floating point input, got {x.dtype}')
    if not torch.jit.is_scripting():
        _check_dtype(x, param_dtype, owner)


def attend_broadcast(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rel_h: torch.Tensor,
        rel_w: torch.Tensor,
) -> torch.Tensor:
    """Windowed attention on whole tensors, channels-first per window.

    Args:
        q: (N, d, bq * bq) queries of each block, already scaled.
        k: (N, d, kh * kw) keys of each block's key window.
        v: (N, dv, kh * kw) values of each window.
        rel_h: (N, bq, bq, kh) height logits (relative term plus border mask) per query and key row.
        rel_w: (N, bq, bq, kw) width logits per query and key column.

    Returns:
        (N, dv, bq * bq)
    """
    n, bq, _, kh = rel_h.shape
    kw = rel_w.shape[-1]
    logits = q.transpose(1, 2) @ k
    # The relative terms are separable per axis: add them by broadcasting instead of materialising them.
    logits = logits.view(n, bq, bq, kh, kw) + rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)
    attn = logits.view(n, bq * bq, kh * kw).softmax(dim=-1)
    return v @ attn.transpose(1, 2)


def _pad(x: torch.Tensor, pad: List[int], custom: bool) -> torch.Tensor:
    """Zero padding; in eager mode no copy at all when nothing is padded (exporters keep the plain op)."""
    if custom and max(pad) == 0:
        return x
    return F.pad(x, pad)


def _bmm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out[:] = a @ b`` without a temporary when the dtypes allow it (under autocast they may not)."""
    if out.dtype == a.dtype:
        return torch.bmm(a, b, out=out)
    return out.copy_(torch.bmm(a, b))


def _tile_attention(
        q: torch.Tensor, k: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, buf: torch.Tensor,
) -> torch.Tensor:
    """Attention probabilities (m, bq^2, kh * kw) of one tile, computed in place in ``buf`` (fp32 or wider)."""
    m, bq, _, kh = rel_h.shape
    # Relative terms first, written by one broadcast add; the GEMM then accumulates onto them. That is two
    # passes over the logits instead of three (GEMM, then an add per axis).
    torch.add(rel_h.unsqueeze(-1), rel_w.unsqueeze(-2), out=buf.view(m, bq, bq, kh, rel_w.shape[-1]))
    if q.dtype == buf.dtype:
        buf.baddbmm_(q.transpose(1, 2), k)
    else:  # autocast: reduced-precision GEMM, accumulated in fp32
        buf.add_(torch.bmm(q.transpose(1, 2), k))
    return torch.softmax(buf, dim=-1, out=buf)


def _attend_tiled_forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, tile: int,
) -> torch.Tensor:
    """Same maths as ``attend_broadcast``, ``tile`` windows at a time.

    Operands are channels-first per window (q: d x bq^2, k/v: d x keys): on CPU the small-width GEMMs of
    attention are several times faster in this orientation. One logits buffer serves all tiles, so the
    allocator (and the kernel's page faults) see one allocation per call, not several per tile.
    """
    n, _, num_q = q.shape
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    out = q.new_empty(n, v.shape[1], num_q)
    buf = q.new_empty(min(tile, n), num_q, k.shape[-1], dtype=acc_dtype)
    for i in range(0, n, tile):
        s = slice(i, i + tile)
        attn = _tile_attention(q[s], k[s], rel_h[s], rel_w[s], buf[:min(tile, n - i)])
        torch.bmm(v[s], attn.to(v.dtype).transpose(1, 2), out=out[s])
    return out


def _attend_tiled_backward(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
        rel_w: torch.Tensor, out: torch.Tensor, tile: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``_attend_tiled_forward``; each tile's logits are recomputed, not stored."""
    n, d, num_q = q.shape
    _, bq, _, kh = rel_h.shape
    kw = rel_w.shape[-1]
    grad_out = grad_out.contiguous()
    # Softmax backward needs rowsum(dA * A) == rowsum(dO * O) per query (flash-attention identity).
    acc_dtype = torch.promote_types(out.dtype, torch.float32)
    delta = (grad_out.to(acc_dtype) * out.to(acc_dtype)).sum(1).unsqueeze(-1)
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    grad_rel_h, grad_rel_w = torch.empty_like(rel_h), torch.empty_like(rel_w)
    attn_buf = q.new_empty(min(tile, n), num_q, kh * kw, dtype=acc_dtype)
    grad_buf = torch.empty_like(attn_buf)
    for i in range(0, n, tile):
        s, m = slice(i, i + tile), min(tile, n - i)
        attn = _tile_attention(q[s], k[s], rel_h[s], rel_w[s], attn_buf[:m])
        torch.bmm(grad_out[s], attn.to(v.dtype), out=grad_v[s])
        grad_logits = _bmm_into(grad_buf[:m], grad_out[s].transpose(1, 2), v[s])
        grad_logits.sub_(delta[s]).mul_(attn)
        grad_logits5 = grad_logits.view(m, bq, bq, kh, kw)
        grad_rel_h[s] = grad_logits5.sum(-1)
        grad_rel_w[s] = grad_logits5.sum(-2)
        grad_logits = grad_logits.to(q.dtype)
        torch.bmm(k[s], grad_logits.transpose(1, 2), out=grad_q[s])
        torch.bmm(q[s], grad_logits, out=grad_k[s])
    return grad_q, grad_k, grad_v, grad_rel_h, grad_rel_w


# A custom op rather than an autograd.Function: eager mode and torch.compile call the same kernel (inductor
# treats it as one opaque node and fuses the projections and reshapes around it).
@torch.library.custom_op('timm_halo::attend_tiled', mutates_args=())
def attend_tiled(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, tile: int,
) -> torch.Tensor:
    """Tiled windowed attention (CPU kernel): arguments and result as ``attend_broadcast``, ``tile`` windows at a
    time; its backward recomputes each tile's logits instead of storing them."""
    return _attend_tiled_forward(q, k, v, rel_h, rel_w, tile)


@attend_tiled.register_fake
def _attend_tiled_fake(q, k, v, rel_h, rel_w, tile):
    return q.new_empty(q.shape[0], v.shape[1], q.shape[2])


def _attend_tiled_setup_context(ctx, inputs, output) -> None:
    q, k, v, rel_h, rel_w, tile = inputs
    ctx.save_for_backward(q, k, v, rel_h, rel_w, output)
    ctx.tile = tile


# The backward is an op of its own too, so that compiled graphs call the kernel rather than trace its tile loop.
@torch.library.custom_op('timm_halo::attend_tiled_backward', mutates_args=())
def _attend_tiled_backward_op(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
        rel_w: torch.Tensor, out: torch.Tensor, tile: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attend_tiled_backward(grad_out, q, k, v, rel_h, rel_w, out, tile)


@_attend_tiled_backward_op.register_fake
def _attend_tiled_backward_fake(grad_out, q, k, v, rel_h, rel_w, out, tile):
    return tuple(torch.empty_like(t) for t in (q, k, v, rel_h, rel_w))


def _attend_tiled_autograd(ctx, grad_out):
    q, k, v, rel_h, rel_w, out = ctx.saved_tensors
    return *_attend_tiled_backward_op(grad_out, q, k, v, rel_h, rel_w, out, ctx.tile), None


attend_tiled.register_autograd(_attend_tiled_autograd, setup_context=_attend_tiled_setup_context)


def _window_views(
        padded: torch.Tensor, heads: int, dim_head: int, step_h: int, len_h: int, step_w: int, len_w: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every key window of (B, heads * (d + dv), Hp, Wp) as strided views, channels first per window: keys
    (B, heads, nh, nw, d, len_h, len_w) and values (..., dv, len_h, len_w)."""
    B, C, _, _ = padded.shape
    windows = padded.unfold(2, len_h, step_h).unfold(3, len_w, step_w)  # B, C, nh, nw, len_h, len_w (a view)
    nh, nw = windows.shape[2], windows.shape[3]
    windows = windows.reshape(B, heads, C // heads, nh, nw, len_h, len_w).permute(0, 1, 3, 4, 2, 5, 6)
    return windows[:, :, :, :, :dim_head], windows[:, :, :, :, dim_head:]


def _unfold_windows(
        padded: torch.Tensor, heads: int, dim_head: int, step_h: int, len_h: int, step_w: int, len_w: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keys (B * heads * nh * nw, d, len_h * len_w) and values (..., dv, len_h * len_w) of every window."""
    k, v = _window_views(padded, heads, dim_head, step_h, len_h, step_w, len_w)
    n = k.shape[0] * k.shape[1] * k.shape[2] * k.shape[3]
    return k.reshape(n, k.shape[4], len_h * len_w), v.reshape(n, v.shape[4], len_h * len_w)


@torch.library.custom_op('timm_halo::gather_windows', mutates_args=())
def gather_windows(
        padded: torch.Tensor, heads: int, dim_head: int, step_h: int, len_h: int, step_w: int, len_w: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``_unfold_windows`` as one op whose backward adds each window's gradient back in a few strided passes.

    Windows overlap (stride < length), so autograd's generic unfold backward is slow. Windows ``g`` apart
    (``g = ceil(length / step)``) do not overlap: each of the g_h * g_w groups is one in-place add into a
    strided view of the padded gradient.
    """
    # Copied into fresh tensors (a reshape may return a view, and a custom op's outputs must not alias its input).
    out = []
    for view in _window_views(padded, heads, dim_head, step_h, len_h, step_w, len_w):
        n = view.shape[0] * view.shape[1] * view.shape[2] * view.shape[3]
        windows = padded.new_empty(n, view.shape[4], len_h * len_w)
        windows.view(view.shape).copy_(view)
        out.append(windows)
    return out[0], out[1]


@gather_windows.register_fake
def _gather_windows_fake(padded, heads, dim_head, step_h, len_h, step_w, len_w):
    B, C, Hp, Wp = padded.shape
    n = B * heads * ((Hp - len_h) // step_h + 1) * ((Wp - len_w) // step_w + 1)
    return (padded.new_empty(n, dim_head, len_h * len_w),
            padded.new_empty(n, C // heads - dim_head, len_h * len_w))


def _gather_windows_setup_context(ctx, inputs, output) -> None:
    padded, *geometry = inputs
    ctx.geometry = (padded.shape, *geometry)
    ctx.windows = [(t.shape, t.dtype, t.device) for t in output]


@torch.library.custom_op('timm_halo::gather_windows_backward', mutates_args=())
def _gather_windows_backward_op(
        grad_k: torch.Tensor, grad_v: torch.Tensor, shape: List[int], heads: int, dim_head: int, step_h: int,
        len_h: int, step_w: int, len_w: int,
) -> torch.Tensor:
    B, C, Hp, Wp = shape
    c = C // heads
    nh, nw = (Hp - len_h) // step_h + 1, (Wp - len_w) // step_w + 1
    grad = grad_k.new_zeros(shape)
    groups_h, groups_w = min(-(-len_h // step_h), nh), min(-(-len_w // step_w), nw)
    for first, part in ((0, grad_k), (dim_head, grad_v)):
        part = part.reshape(B, heads, nh, nw, part.shape[1], len_h, len_w)
        for gy in range(groups_h):
            for gx in range(groups_w):
                group = part[:, :, gy::groups_h, gx::groups_w]
                target = grad.as_strided(
                    group.shape,
                    (C * Hp * Wp, c * Hp * Wp, groups_h * step_h * Wp, groups_w * step_w, Hp * Wp, Wp, 1),
                    first * Hp * Wp + gy * step_h * Wp + gx * step_w)
                target.add_(group)
    return grad


@_gather_windows_backward_op.register_fake
def _gather_windows_backward_fake(grad_k, grad_v, shape, heads, dim_head, step_h, len_h, step_w, len_w):
    return grad_k.new_empty(shape)


def _gather_windows_backward(ctx, grad_k, grad_v):
    shape, *geometry = ctx.geometry
    # A window output nobody used has no gradient: it contributes zeros.
    grad_k, grad_v = [g if g is not None else torch.zeros(size, dtype=dtype, device=device)
                      for g, (size, dtype, device) in zip((grad_k, grad_v), ctx.windows)]
    return _gather_windows_backward_op(grad_k, grad_v, list(shape), *geometry), None, None, None, None, None, None


gather_windows.register_autograd(_gather_windows_backward, setup_context=_gather_windows_setup_context)


@register_notrace_module  # a leaf for torch.fx feature extraction: its shape arithmetic is not symbolic
class HaloAttention(nn.Module):
    """Halo attention: blocked local self-attention with 2-D relative positions. NCHW in, NCHW out.

    Args:
        dim: input channels.
        block_size: query block side b.
        halo_size: halo h around each block; the key window side is b + 2h.
        dim_head: query/key channels per head.
        heads: number of attention heads.
        dim_out: output channels (default ``dim``). If it differs from ``heads * dim_head * value_ratio``
            a 1x1 output projection is added (as in lucidrains' halonet-pytorch); otherwise none.
        stride: 1, or 2 for strided attention (queries subsampled inside each block).
        value_ratio: value channels per head relative to ``dim_head`` (the paper's rv).
        qkv_bias: add a bias to the q and kv projections.
    """

    def __init__(
            self,
            dim: int,
            block_size: int = 8,
            halo_size: int = 3,
            dim_head: int = 64,
            heads: int = 8,
            dim_out: Optional[int] = None,
            stride: int = 1,
            value_ratio: float = 1.0,
            qkv_bias: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        for name, value, lowest in (
                ('dim', dim, 1), ('block_size', block_size, 1), ('halo_size', halo_size, 0),
                ('dim_head', dim_head, 1), ('heads', heads, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f'HaloAttention: {name} must be an integer >= {lowest}, got {value!r}')
        if stride not in (1, 2):
            raise ValueError(f'HaloAttention: stride must be 1 or 2, got {stride!r}')
        if block_size % stride:
            raise ValueError(
                f'HaloAttention: block_size ({block_size}) must be divisible by stride ({stride}) '
                'so that every block keeps the same number of queries')
        dim_head_v = int(round(dim_head * value_ratio))
        if dim_head_v < 1:
            raise ValueError(f'HaloAttention: value_ratio {value_ratio!r} leaves no value channels')
        dim_out = dim if dim_out is None else dim_out

        self.dim = dim
        self.dim_out = dim_out
        self.heads = heads
        self.dim_head = dim_head
        self.dim_head_v = dim_head_v
        self.block_size = block_size
        self.halo_size = halo_size
        self.win_size = block_size + 2 * halo_size
        self.stride = stride
        self.scale = dim_head ** -0.5

        self.q = nn.Conv2d(dim, heads * dim_head, 1, bias=qkv_bias, **dd)
        self.kv = nn.Conv2d(dim, heads * (dim_head + dim_head_v), 1, bias=qkv_bias, **dd)
        # One entry per possible offset between a query and a key of its window, centred on offset 0.
        num_rel = 2 * (block_size + halo_size) - 1
        self.rel_pos_h = nn.Parameter(torch.empty(num_rel, dim_head, **dd))
        self.rel_pos_w = nn.Parameter(torch.empty(num_rel, dim_head, **dd))
        inner_v = heads * dim_head_v
        self.proj = nn.Conv2d(inner_v, dim_out, 1, **dd) if inner_v != dim_out else nn.Identity()

        self.reset_parameters()

    def reset_parameters(self) -> None:
        trunc_normal_(self.q.weight, std=self.dim ** -0.5)
        trunc_normal_(self.kv.weight, std=self.dim ** -0.5)
        trunc_normal_(self.rel_pos_h, std=self.scale)
        trunc_normal_(self.rel_pos_w, std=self.scale)

    def extra_repr(self) -> str:
        return (
            f'dim={self.dim}, dim_out={self.dim_out}, heads={self.heads}, dim_head={self.dim_head}, '
            f'dim_head_v={self.dim_head_v}, block_size={self.block_size}, halo_size={self.halo_size}, '
            f'stride={self.stride}')

    def _check_input(self, x: torch.Tensor) -> None:
        check_image_input(x, self.dim, self.q.weight.dtype, 'HaloAttention')

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """Spatial size of the output for an input of ``height x width``."""
        # (n + s - 1) // s rather than -(-n // s): the ONNX exporter turns // into Div, which truncates
        # toward zero, so floor division of a negative size would be wrong for dynamic input sizes.
        return (height + self.stride - 1) // self.stride, (width + self.stride - 1) // self.stride

    def _window_plan(self, size: int, blocks: int, crop: bool) -> Tuple[int, int, int, int]:
        """Key windows along one axis: (padding before, padding after, step, length).

        The plain plan pads by the halo and cuts one ``b + 2h`` window per block, ``b`` apart. With ``crop``,
        maps of one or two blocks (late stages: 8x8 or 16x16 at block 8) get shorter windows that skip the
        halo rows lying outside the image, which would all be masked: at 8x8 that is 64 keys instead of 196.
        """
        b, h = self.block_size, self.halo_size
        if crop and blocks == 1:
            return 0, 0, b, size  # the whole axis is one window
        if crop and blocks == 2 and h < b:
            # block 0 sees rows [0, b + h), block 1 rows [b - h, size): one length covers both
            step = b - h
            length = max(min(size, b + h), size - step)
            return 0, step + length - size, step, length
        return h, blocks * b + h - size, b, b + 2 * h

    def _axis_terms(
            self, size: int, blocks: int, plan: Tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Relative-table rows (blocks, bq, length) of each (block, query, key slot) and the additive border
        mask (blocks, length): 0 where the key lies inside the image and inside the block's halo window."""
        b, h, s = self.block_size, self.halo_size, self.stride
        pad_before, _, step, length = plan
        block_start = torch.arange(blocks, device=device) * b
        key_pos = (torch.arange(blocks, device=device) * step - pad_before)[:, None] + torch.arange(
            length, device=device)[None, :]
        visible = (key_pos >= 0) & (key_pos < size) & (key_pos >= block_start[:, None] - h) & (
            key_pos < block_start[:, None] + b + h)
        query_pos = block_start[:, None] + torch.arange(0, b, s, device=device)[None, :]
        # Invisible keys may have offsets beyond the table: clamp them to a valid row, the mask removes them.
        rows = (key_pos[:, None, :] - query_pos[:, :, None] + b + h - 1).clamp(0, 2 * (b + h - 1))
        # A row mask and a column mask can both hit one logit: a quarter of the dtype's lowest finite value
        # keeps their sum (plus any real logit) finite in fp16/bf16/fp32. nan_to_num gives that value in a
        # TorchScript-friendly way (torch.finfo is not scriptable).
        masked = torch.full((), float('-inf'), dtype=dtype, device=device).nan_to_num() / 4
        return rows, torch.where(visible, torch.zeros_like(masked), masked)

    def _use_custom_kernels(self) -> bool:
        """Eager mode and torch.compile: the custom ops and size-dependent window plans are allowed."""
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return False
        return self._not_exporting()

    @torch.jit.unused
    def _not_exporting(self) -> bool:
        # Export (torch.export, ONNX) keeps plain ATen ops and plain windows: no custom ops to ship, and no
        # size-dependent branches in a graph that may take dynamic sizes.
        return not torch.compiler.is_exporting()

    def _project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """q (scaled: the scale rides on the small weight, not on the activations) and kv projections."""
        q_weight, q_bias = self.q.weight * self.scale, self.q.bias
        if q_bias is not None:
            q_bias = q_bias * self.scale
        if self.stride > 1:
            return F.conv2d(x[:, :, ::self.stride, ::self.stride], q_weight, q_bias), self.kv(x)
        # Same input: one convolution for both reads x once.
        kv_bias = self.kv.bias
        bias = torch.cat([q_bias, kv_bias]) if q_bias is not None and kv_bias is not None else None
        qkv = F.conv2d(x, torch.cat([q_weight, self.kv.weight]), bias)
        q, kv = qkv.split([self.heads * self.dim_head, self.kv.out_channels], dim=1)  # backward: one cat
        return q, kv

    def _blocked(
            self, x: torch.Tensor, custom: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, List[int]]:
        """Project and cut into blocks, channels first per block: q (N, d, bq^2), k (N, d, kh * kw),
        v (N, dv, kh * kw), rel_h (N, bq, bq, kh), rel_w (N, bq, bq, kw), with N = B * heads * nh * nw."""
        B, _, H, W = x.shape
        b, s = self.block_size, self.stride
        bq = b // s
        nh, nw = (H + b - 1) // b, (W + b - 1) // b  # ceil division without negatives (see output_size)
        hq, wq = self.output_size(H, W)
        heads, d = self.heads, self.dim_head

        q, kv = self._project(x)
        q = _pad(q, [0, nw * bq - wq, 0, nh * bq - hq], custom)
        q = q.reshape(B, heads, d, nh, bq, nw, bq).permute(0, 1, 3, 5, 2, 4, 6)
        n = B * heads * nh * nw
        # One contiguous copy, shared by the attention and (as a view) the relative terms: one copy to keep.
        q = q.reshape(n, d, bq * bq)
        q_blocks = q.view(B, heads, nh, nw, d, bq, bq)

        plan_h, plan_w = self._window_plan(H, nh, custom), self._window_plan(W, nw, custom)
        rows_h, mask_h = self._axis_terms(H, nh, plan_h, q.dtype, x.device)
        rows_w, mask_w = self._axis_terms(W, nw, plan_w, q.dtype, x.device)
        # Relative logits per axis: q . table[offset] for each (query row, key row) pair of each block
        # (q is scaled, hence the tables are divided by the scale).
        rel_h = torch.einsum('bnhwdyx,hykd->bnhwyxk', q_blocks, self.rel_pos_h[rows_h] / self.scale)
        rel_w = torch.einsum('bnhwdyx,wxkd->bnhwyxk', q_blocks, self.rel_pos_w[rows_w] / self.scale)
        # The border mask is separable too, so it rides on the per-axis terms.
        rel_h = rel_h + mask_h[:, None, None, None, :]
        rel_w = rel_w + mask_w[:, None, None, :]

        kv = _pad(kv, [plan_w[0], plan_w[1], plan_h[0], plan_h[1]], custom)
        if custom:
            k, v = self._gather_windows(kv, plan_h, plan_w)
        else:
            k, v = _unfold_windows(kv, heads, d, plan_h[2], plan_h[3], plan_w[2], plan_w[3])

        return (q, k, v, rel_h.reshape(n, bq, bq, plan_h[3]),
                rel_w.reshape(n, bq, bq, plan_w[3]), [B, nh, nw, hq, wq])

    @torch.jit.unused
    def _gather_windows(
            self, kv: torch.Tensor, plan_h: Tuple[int, int, int, int], plan_w: Tuple[int, int, int, int],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        return gather_windows(kv, self.heads, self.dim_head, plan_h[2], plan_h[3], plan_w[2], plan_w[3])

    @torch.jit.unused
    def _attend_tiled(self, q, k, v, rel_h, rel_w) -> torch.Tensor:
        per_window = q.shape[-1] * k.shape[-1]
        # Up to _TILE_LOGITS per tile, but at least 8 tiles where that still leaves a quarter of it: the tile
        # buffers then stay small next to the layer's own activations, at no cost in speed.
        tile_logits = min(_TILE_LOGITS, max(_TILE_LOGITS // 4, q.shape[0] * per_window // 8))
        return attend_tiled(q, k, v, rel_h, rel_w, max(1, tile_logits // per_window))

    def _use_tiled(self, x: torch.Tensor) -> bool:
        return x.device.type == 'cpu' and self._use_custom_kernels()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        q, k, v, rel_h, rel_w, geom = self._blocked(x, self._use_custom_kernels())
        if self._use_tiled(x):
            out = self._attend_tiled(q, k, v, rel_h, rel_w)
        else:
            out = attend_broadcast(q, k, v, rel_h, rel_w)
        return self.proj(self._unblock(out, geom))

    def _unblock(self, out: torch.Tensor, geom: List[int]) -> torch.Tensor:
        B, nh, nw, hq, wq = geom
        bq = self.block_size // self.stride
        out = out.reshape(B, self.heads, nh, nw, self.dim_head_v, bq, bq).permute(0, 1, 4, 2, 5, 3, 6)
        out = out.reshape(B, self.heads * self.dim_head_v, nh * bq, nw * bq)
        return out[:, :, :hq, :wq]

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dense attention over all pixels with an explicit window mask: slow, for tests only."""
        self._check_input(x)
        B, _, H, W = x.shape
        b, h, s = self.block_size, self.halo_size, self.stride
        heads, d = self.heads, self.dim_head
        hq, wq = self.output_size(H, W)

        # per-head channel groups, every pixel a token
        q = rearrange(self.q(x)[:, :, ::s, ::s], 'b (n d) h w -> b n d (h w)', n=heads)
        kv = rearrange(self.kv(x), 'b (n c) h w -> b n c (h w)', n=heads)
        k, v = kv[:, :, :d], kv[:, :, d:]

        qy, qx = torch.meshgrid(torch.arange(hq) * s, torch.arange(wq) * s, indexing='ij')
        ky, kx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing='ij')
        qy, qx, ky, kx = qy.reshape(-1, 1), qx.reshape(-1, 1), ky.reshape(1, -1), kx.reshape(1, -1)
        # A key is visible to a query iff it lies in the halo window of the query's block.
        top, left = (qy // b) * b - h, (qx // b) * b - h
        visible = (ky >= top) & (ky < top + b + 2 * h) & (kx >= left) & (kx < left + b + 2 * h)
        # Table row of each (query, key) offset; pairs outside the window are masked, clamp keeps them in range.
        center = b + h - 1
        pos_h = self.rel_pos_h[(ky - qy + center).clamp(0, 2 * center)]
        pos_w = self.rel_pos_w[(kx - qx + center).clamp(0, 2 * center)]

        content = torch.einsum('bndq,bndk->bnqk', q, k) * self.scale
        rel = torch.einsum('bndq,qkd->bnqk', q, pos_h) + torch.einsum('bndq,qkd->bnqk', q, pos_w)
        logits = (content + rel).masked_fill(~visible, float('-inf'))
        out = torch.einsum('bnqk,bndk->bndq', logits.softmax(-1), v)
        return self.proj(rearrange(out, 'b n d (h w) -> b (n d) h w', h=hq))
