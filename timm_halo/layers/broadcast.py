"""Windowed attention on whole tensors: plain ATen ops, so every autograd mode, device, exporter and transform
handles it. One logits tensor per call (no tiling); the per-axis relative terms are added by broadcasting, or in
exported graphs through the matrix products."""
import torch

__all__ = ['attend_augmented', 'attend_broadcast', 'key_one_hots']


def key_one_hots(kh: int, kw: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(kh * kw, kh + kw): key j = r * kw + c of a window as [onehot(r), onehot(c)]."""
    # Comparisons, not F.one_hot: no bounds check (a device sync on CUDA), one elementwise op for torch.compile.
    keys = torch.arange(kh * kw, device=device)
    return torch.cat([((keys // kw)[:, None] == torch.arange(kh, device=device)).to(dtype),
                      ((keys % kw)[:, None] == torch.arange(kw, device=device)).to(dtype)], dim=-1)


def attend_broadcast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Attention of each block's queries q (N, d, bq^2) over its key window, k (N, d, kh * kw) and v (N, dv, kh * kw),
    with the per-axis logits rel_h (N, bq, bq, kh) and rel_w (N, bq, bq, kw), giving (N, dv, bq^2)."""
    n, bq, _, kh = rel_h.shape
    kw = rel_w.shape[-1]
    logits = (q.transpose(1, 2) @ k) * scale
    # The relative terms are separable per axis: add them by broadcasting instead of materialising them.
    logits = (logits.view(n, bq, bq, kh, kw) + rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).view(n, bq * bq, -1)
    return v @ logits.softmax(dim=-1).transpose(1, 2)


def attend_augmented(queries: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """``attend_broadcast`` for exported graphs: ``queries`` (N, bq^2, d + kh + kw) is [scale q, rel_h, rel_w] per
    query, k (N, d, kh * kw) and v (N, dv, kh * kw) as there (docs/kernels.md, Exported graphs)."""
    # For ONNX Runtime, which walks broadcast adds in spans as short as a window row: the relative terms go through
    # the matrix product instead. With E[i, (y, x)] = [i == y] and E[kh + j, (y, x)] = [j == x], [rel_h, rel_w] @ E
    # lays them out over the window exactly (one nonzero product per sum). With more queries than relative terms
    # they ride on the logits' own product against k' = [k, E] (no add); else a product with E and an add.
    n, num_q, width = queries.shape
    one_hots = key_one_hots(kh, kw, queries.dtype, queries.device)
    if num_q > kh + kw:
        keys = torch.cat([k.transpose(1, 2), one_hots.expand(n, -1, -1)], -1)  # pixel-major: no transposes
        logits = queries @ keys.transpose(1, 2)
    else:
        d = width - kh - kw
        logits = queries[:, :, :d] @ k + queries[:, :, d:] @ one_hots.t()
    return v @ logits.softmax(dim=-1).transpose(1, 2)
