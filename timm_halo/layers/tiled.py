"""Tiled windowed attention for CPUs: a flash-attention style kernel in ATen ops as ``torch.library`` custom ops
(logits built per tile of windows in one reused buffer, recomputed in the backward; docs/kernels.md)."""
import threading
from typing import Callable, Tuple

import torch

from .broadcast import attend_broadcast
from .tile_pool import run_tiles

__all__ = ['attend_tiled', 'TILE_LOGITS']

# Most logits per tile (4 MB in fp32): small enough to stay in the cache, large enough that the per-tile overhead
# (a few small parallel ops) is negligible. Tuned on a 2-core x86 VM at HaloNet's stage-1 shape.
TILE_LOGITS = 1 << 20


def _tile_windows(n: int, per_window: int, tile_logits: int) -> int:
    """Windows per tile: up to ``tile_logits`` logits, but at least 8 tiles where that still leaves a quarter of it."""
    # so the tile buffers stay small next to the layer's own activations
    budget = min(tile_logits, max(tile_logits // 4, n * per_window // 8))
    return max(1, budget // max(per_window, 1))


def _into(out: torch.Tensor, op: Callable[..., torch.Tensor], x: torch.Tensor, *args) -> torch.Tensor:
    """``out[:] = op(x, *args)`` without a temporary when the dtypes agree (under autocast they may not)."""
    return op(x, *args, out=out) if out.dtype == x.dtype else out.copy_(op(x, *args))


def _tile_attention(q: torch.Tensor, k: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, scale: float,
                    buf: torch.Tensor) -> torch.Tensor:
    """Attention probabilities (m, bq^2, kh * kw) of one tile, computed in place in ``buf`` (fp32 or wider)."""
    m, bq, _, kh = rel_h.shape
    # Relative terms first, written by one broadcast add; the GEMM then accumulates onto them: two passes over
    # the logits instead of three.
    torch.add(rel_h.unsqueeze(-1), rel_w.unsqueeze(-2), out=buf.view(m, bq, bq, kh, rel_w.shape[-1]))
    if q.dtype == buf.dtype:
        buf.baddbmm_(q.transpose(1, 2), k, alpha=scale)
    else:  # autocast: reduced-precision GEMM, accumulated in fp32
        buf.add_(torch.bmm(q.transpose(1, 2), k), alpha=scale)
    return torch.softmax(buf, dim=-1, out=buf)


_scratch = threading.local()


def _scratch_buffer(slot: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A reusable per-thread buffer of at least ``numel`` elements."""
    # the allocator (and the page faults of fresh memory) see one allocation per thread, not one per tile
    buf = getattr(_scratch, slot, None)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        setattr(_scratch, slot, buf)
    return buf[:numel]


@torch.library.custom_op('timm_halo::attend_tiled', mutates_args=())
def attend_tiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                 scale: float, tile_logits: int = TILE_LOGITS) -> torch.Tensor:
    """Tiled windowed attention (CPU): arguments and result as ``attend_broadcast``; at most ``tile_logits`` logits
    live at a time (the tile derived in here from the real shapes: compiled graphs carry no arithmetic for it)."""
    (n, _, num_q), num_k = q.shape, k.shape[-1]
    tile = _tile_windows(n, num_q * num_k, tile_logits)
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    out = q.new_empty(n, v.shape[1], num_q)

    def run(start: int, stop: int) -> None:
        s, m = slice(start, stop), stop - start
        buf = _scratch_buffer('attn', m * num_q * num_k, acc_dtype).view(m, num_q, num_k)
        attn = _tile_attention(q[s], k[s], rel_h[s], rel_w[s], scale, buf)
        torch.bmm(v[s], attn.to(v.dtype).transpose(1, 2), out=out[s])

    run_tiles(run, n, tile)
    return out


@attend_tiled.register_fake
def _attend_tiled_fake(q, k, v, rel_h, rel_w, scale, tile_logits=TILE_LOGITS):
    return q.new_empty(q.shape[0], v.shape[1], q.shape[2])


# The backward is an op of its own too, so that compiled graphs call the kernel rather than trace its tile loop; each
# tile's logits are recomputed, not stored.
@torch.library.custom_op('timm_halo::attend_tiled_backward', mutates_args=())
def _attend_tiled_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           rel_h: torch.Tensor, rel_w: torch.Tensor, out: torch.Tensor, scale: float, tile_logits: int,
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    (n, _, num_q), (_, bq, _, kh), kw = q.shape, rel_h.shape, rel_w.shape[-1]
    tile = _tile_windows(n, num_q * kh * kw, tile_logits)
    grad_out = grad_out.contiguous()
    acc_dtype = torch.promote_types(out.dtype, torch.float32)
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    grad_rel_h, grad_rel_w = torch.empty_like(rel_h), torch.empty_like(rel_w)

    def run(start: int, stop: int) -> None:
        s, m = slice(start, stop), stop - start
        # Softmax backward needs rowsum(dA * A) == rowsum(dO * O) per query (flash-attention identity).
        delta = (grad_out[s].to(acc_dtype) * out[s].to(acc_dtype)).sum(1).unsqueeze(-1)
        attn_buf = _scratch_buffer('attn', m * num_q * kh * kw, acc_dtype).view(m, num_q, kh * kw)
        grad_buf = _scratch_buffer('grad', m * num_q * kh * kw, acc_dtype).view(m, num_q, kh * kw)
        attn = _tile_attention(q[s], k[s], rel_h[s], rel_w[s], scale, attn_buf)
        torch.bmm(grad_out[s], attn.to(v.dtype), out=grad_v[s])
        grad_logits = _into(grad_buf, torch.bmm, grad_out[s].transpose(1, 2), v[s])
        grad_logits.sub_(delta).mul_(attn)
        grad_logits5 = grad_logits.view(m, bq, bq, kh, kw)
        _into(grad_rel_h[s], torch.sum, grad_logits5, -1)
        _into(grad_rel_w[s], torch.sum, grad_logits5, -2)
        grad_logits = grad_logits.to(q.dtype)
        # The content scale goes on the small (d x queries, d x keys) results, not on the tile of logits.
        torch.bmm(k[s], grad_logits.transpose(1, 2), out=grad_q[s]).mul_(scale)
        torch.bmm(q[s], grad_logits, out=grad_k[s]).mul_(scale)

    run_tiles(run, n, tile)
    return grad_q, grad_k, grad_v, grad_rel_h, grad_rel_w


@_attend_tiled_backward.register_fake
def _attend_tiled_backward_fake(grad_out, q, k, v, rel_h, rel_w, out, scale, tile_logits):
    return tuple(torch.empty_like(t) for t in (q, k, v, rel_h, rel_w))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, rel_h, rel_w, scale, tile_logits = inputs
    ctx.save_for_backward(q, k, v, rel_h, rel_w, output)
    ctx.scale, ctx.tile_logits = scale, tile_logits


def differentiable_backward(grad_out: torch.Tensor, inputs, recompute: Callable[..., torch.Tensor]) -> tuple:
    """``create_graph=True``: a kernel's gradients through plain ops (``recompute(*inputs)``, the kernel's output
    in ATen ops), so that they can be differentiated again."""
    # Fresh aliases of the inputs: rel_h / rel_w are functions of q, and a gradient taken with respect to q itself
    # would also run through them (counted again by the outer backward).
    aliases = [None if t is None else t.view_as(t) for t in inputs]
    needed = [a for a in aliases if a is not None and a.requires_grad]
    with torch.enable_grad():
        out = recompute(*aliases)
    found = iter(torch.autograd.grad(out, needed, grad_out, create_graph=True, allow_unused=True))
    return tuple(next(found) if a is not None and a.requires_grad else None for a in aliases)


def _autograd(ctx, grad_out):
    q, k, v, rel_h, rel_w, out = ctx.saved_tensors
    if torch.is_grad_enabled():
        grads = differentiable_backward(grad_out, (q, k, v, rel_h, rel_w), lambda *a: attend_broadcast(*a, ctx.scale))
    else:
        grads = _attend_tiled_backward(grad_out, q, k, v, rel_h, rel_w, out, ctx.scale, ctx.tile_logits)
    return *grads, None, None


attend_tiled.register_autograd(_autograd, setup_context=_setup_context)
