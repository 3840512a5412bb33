"""Blocks and key/value windows of the blocked layout: plain (differentiable, exportable) ops and a custom op
whose backward adds each window's gradient back in a few strided passes (docs/kernels.md, Windows)."""
from typing import List, Tuple

import torch
import torch.nn.functional as F

__all__ = ['blocks_to_map', 'gather_windows', 'map_to_blocks', 'unfold_windows']


def pad_map(x: torch.Tensor, pad: List[int], skip_empty: bool) -> torch.Tensor:
    """Zero padding; with ``skip_empty``, no copy at all when nothing is padded and the sizes are plain ints (eager
    mode, exports of one size); under dynamo the pad always stays (docs/kernels.md)."""
    return x if skip_empty and _static_zeros(pad) else F.pad(x, pad)


@torch.jit.unused
def _dynamo_tracing() -> bool:
    # torch.compile, strict torch.export: dynamo answers isinstance(size, int) with True for a symbolic size too
    return torch.compiler.is_dynamo_compiling()


def _static_zeros(sizes: List[int]) -> bool:
    """All zero, and plain ints: a torch.SymInt (a dynamic-size export) is never compared, which would specialise the
    graph to this size. Never under dynamo (see ``_dynamo_tracing``)."""
    if _dynamo_tracing():
        return False
    for n in sizes:
        if not isinstance(n, int) or n != 0:
            return False
    return True


def map_to_blocks(x: torch.Tensor, bq: int, nh: int, nw: int, skip_empty: bool = False) -> torch.Tensor:
    """(G, C, H, W), zero-padded to nh x nw blocks of bq x bq, as (G * nh * nw, C, bq * bq), blocks row-major."""
    G, C, H, W = x.shape
    x = pad_map(x, [0, nw * bq - W, 0, nh * bq - H], skip_empty)
    return x.reshape(G, C, nh, bq, nw, bq).permute(0, 2, 4, 1, 3, 5).reshape(G * nh * nw, C, bq * bq)


def blocks_to_map(blocks: torch.Tensor, bq: int, nh: int, nw: int, height: int, width: int,
                  fresh: bool = True) -> torch.Tensor:
    """The inverse of ``map_to_blocks``: (G * nh * nw, C, bq * bq) to (G, C, height, width); ``fresh``: always a new
    tensor, never a view of ``blocks`` (the crop is a negative ``F.pad``, which inductor also lowers for symbolic
    sizes). Exported graphs need no fresh tensor, and a crop of nothing would be a copy there."""
    n, C = blocks.shape[:2]
    out = blocks.reshape(n // (nh * nw), nh, nw, C, bq, bq).permute(0, 3, 1, 4, 2, 5)
    out = out.reshape(n // (nh * nw), C, nh * bq, nw * bq)
    crop = [0, width - nw * bq, 0, height - nh * bq]
    return out if not fresh and _static_zeros(crop) else F.pad(out, crop)


def unfold_windows(padded: torch.Tensor, heads: int, dim_head: int, step_h: int, len_h: int, step_w: int,
                   len_w: int, channels_last: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keys (B * heads * nh * nw, d, len_h * len_w) and values (..., dv, len_h * len_w) of every window in plain
    ATen ops: one gather of whole pixels, returned as channels-first views (docs/kernels.md, Windows).
    ``channels_last``: ``padded`` is (B, Hp, Wp, C)."""
    if channels_last:
        B, Hp, Wp, C = padded.shape
        pixels = padded.reshape(B, Hp * Wp, heads, C // heads).transpose(1, 2).reshape(B * heads, Hp * Wp, -1)
    else:
        B, C, Hp, Wp = padded.shape
        pixels = padded.reshape(B * heads, C // heads, Hp * Wp).transpose(1, 2)
    nh, nw = (Hp - len_h) // step_h + 1, (Wp - len_w) // step_w + 1
    rows = (torch.arange(nh, device=padded.device) * step_h)[:, None] + torch.arange(len_h, device=padded.device)
    cols = (torch.arange(nw, device=padded.device) * step_w)[:, None] + torch.arange(len_w, device=padded.device)
    index = (rows[:, None, :, None] * Wp + cols[None, :, None, :]).reshape(-1)  # (block row, column, y, x)
    windows = pixels.index_select(1, index).reshape(B * heads * nh * nw, len_h * len_w, C // heads)
    return windows[:, :, :dim_head].transpose(1, 2), windows[:, :, dim_head:].transpose(1, 2)


@torch.library.custom_op('timm_halo::gather_windows', mutates_args=())
def gather_windows(padded: torch.Tensor, heads: int, dim_head: int, step_h: int, len_h: int, step_w: int,
                   len_w: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``unfold_windows`` as one op whose backward (``scatter_windows``) adds each window's gradient back in a few
    strided passes (docs/kernels.md, Windows)."""
    B, C, _, _ = padded.shape
    windows = padded.unfold(2, len_h, step_h).unfold(3, len_w, step_w)  # B, C, nh, nw, len_h, len_w (a view)
    windows = windows.reshape(B, heads, C // heads, *windows.shape[2:]).permute(0, 1, 3, 4, 2, 5, 6)
    # One strided copy each, channels first per window: fresh tensors (a custom op's outputs must not alias its input).
    k, v = [t.clone(memory_format=torch.contiguous_format).view(-1, t.shape[4], len_h * len_w)
            for t in (windows[:, :, :, :, :dim_head], windows[:, :, :, :, dim_head:])]
    return k, v


@gather_windows.register_fake
def _gather_windows_fake(padded, heads, dim_head, step_h, len_h, step_w, len_w):
    B, C, Hp, Wp = padded.shape
    n = B * heads * ((Hp - len_h) // step_h + 1) * ((Wp - len_w) // step_w + 1)
    return padded.new_empty(n, dim_head, len_h * len_w), padded.new_empty(n, C // heads - dim_head, len_h * len_w)


@torch.library.custom_op('timm_halo::scatter_windows', mutates_args=())
def scatter_windows(grad_k: torch.Tensor, grad_v: torch.Tensor, shape: List[int], heads: int, dim_head: int,
                    step_h: int, len_h: int, step_w: int, len_w: int) -> torch.Tensor:
    """The adjoint of ``gather_windows``: windows (as it returns them) summed back into a (B, C, Hp, Wp) map."""
    B, C, Hp, Wp = shape
    c = C // heads
    nh, nw = (Hp - len_h) // step_h + 1, (Wp - len_w) // step_w + 1
    grad = grad_k.new_zeros(shape)
    groups_h, groups_w = min(-(-len_h // step_h), nh), min(-(-len_w // step_w), nw)
    strides = (C * Hp * Wp, c * Hp * Wp, groups_h * step_h * Wp, groups_w * step_w, Hp * Wp, Wp, 1)
    for first, part in ((0, grad_k), (dim_head, grad_v)):
        part = part.reshape(B, heads, nh, nw, part.shape[1], len_h, len_w)
        for gy in range(groups_h):
            for gx in range(groups_w):
                group = part[:, :, gy::groups_h, gx::groups_w]
                grad.as_strided(group.shape, strides, first * Hp * Wp + gy * step_h * Wp + gx * step_w).add_(group)
    return grad


@scatter_windows.register_fake
def _scatter_windows_fake(grad_k, grad_v, shape, heads, dim_head, step_h, len_h, step_w, len_w):
    return grad_k.new_empty(shape)


def _gather_setup_context(ctx, inputs, output) -> None:
    padded, *geometry = inputs
    ctx.geometry = (list(padded.shape), *geometry)
    ctx.windows = [(t.shape, t.dtype, t.device) for t in output]


def _gather_backward(ctx, grad_k, grad_v):
    shape, *geometry = ctx.geometry
    # A window output nobody used has no gradient: it contributes zeros.
    grad_k, grad_v = [g if g is not None else torch.zeros(size, dtype=dtype, device=device)
                      for g, (size, dtype, device) in zip((grad_k, grad_v), ctx.windows)]
    return scatter_windows(grad_k, grad_v, shape, *geometry), None, None, None, None, None, None


def _scatter_setup_context(ctx, inputs, output) -> None:
    _, _, _, *geometry = inputs
    ctx.geometry = geometry


def _scatter_backward(ctx, grad):
    # scatter is linear; its adjoint is the gather (double backward, Hessian-vector products).
    grad_k, grad_v = gather_windows(grad.contiguous(), *ctx.geometry)
    return grad_k, grad_v, None, None, None, None, None, None, None


gather_windows.register_autograd(_gather_backward, setup_context=_gather_setup_context)
scatter_windows.register_autograd(_scatter_backward, setup_context=_scatter_setup_context)
