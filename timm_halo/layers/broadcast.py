"""Windowed attention on whole tensors: plain ATen ops, so every autograd mode, device, exporter and transform
handles it. One logits tensor per call (no tiling); the per-axis relative terms are added by broadcasting."""
import torch

__all__ = ['attend_broadcast']


def attend_broadcast(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rel_h: torch.Tensor,
        rel_w: torch.Tensor,
        scale: float,
        one_hot: bool = False,
) -> torch.Tensor:
    """Attention of each block's queries over its key window, channels-first per window.

    Args:
        q: (N, d, bq * bq) queries of each block (unscaled).
        k: (N, d, kh * kw) keys of each block's key window.
        v: (N, dv, kh * kw) values of each window.
        rel_h: (N, bq, bq, kh) height logits (relative term plus border mask) per query and key row.
        rel_w: (N, bq, bq, kw) width logits per query and key column.
        scale: factor of the content logits ``q . k``.
        one_hot: lay the relative terms out over the window with a matrix product (for ONNX Runtime, see below).

    Returns:
        (N, dv, bq * bq)
    """
    n, bq, _, kh = rel_h.shape
    kw = rel_w.shape[-1]
    logits = (q.transpose(1, 2) @ k) * scale
    if one_hot:
        # [rel_h, rel_w] @ E with E[i, (y, x)] = [i == y] and E[kh + j, (y, x)] = [j == x]: exact (one nonzero
        # product per sum), and one matrix product plus a same-shape add run faster in ONNX Runtime than two
        # broadcast adds, which it walks in spans as short as a window row. Not in eager: counted MACs stay the
        # model's own.
        expand = torch.cat([torch.eye(kh, dtype=q.dtype, device=q.device).repeat_interleave(kw, 1),
                            torch.eye(kw, dtype=q.dtype, device=q.device).repeat(1, kh)])
        logits = logits + torch.cat([rel_h, rel_w], -1).view(n, bq * bq, kh + kw) @ expand
    else:
        # The relative terms are separable per axis: add them by broadcasting instead of materialising them.
        logits = (logits.view(n, bq, bq, kh, kw) + rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).view(n, bq * bq, -1)
    return v @ logits.softmax(dim=-1).transpose(1, 2)
