"""Windowed attention as one fused ``F.scaled_dot_product_attention`` call, the relative terms folded into q/k.

The logit of query ``i`` and key ``j = (row, col)`` of a window is ``scale * q_i . k_j + Lh[i, row] + Lw[i, col]``
(``Lh``/``Lw``: the per-axis relative terms with the border mask). With

    q'_i = [scale * q_i, Lh[i, :], Lw[i, :]]        k'_j = [k_j, onehot(row), onehot(col)]

``q'_i . k'_j`` is exactly that logit, so SDPA with ``scale=1`` and no ``attn_mask`` computes the layer, windows
as the batch. No mask means every fused backend qualifies (CPU flash; CUDA flash, memory-efficient, cuDNN), the
logits are never stored, and the gradients reach the relative tables through ``Lh``/``Lw`` by ordinary
autograd. Widths are padded to one multiple of 8 for q', k' and v (flash kernels need equal head widths).
"""
import torch
import torch.nn.functional as F

__all__ = ['attend_sdpa']


def _padded_width(d: int, kh: int, kw: int, dv: int) -> int:
    width = max(d + kh + kw, dv)
    return width + (-width) % 8


def attend_sdpa(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rel_h: torch.Tensor,
        rel_w: torch.Tensor,
        scale: float,
) -> torch.Tensor:
    """Arguments and result as ``attend_broadcast``."""
    n, d, num_q = q.shape
    kh, kw = rel_h.shape[-1], rel_w.shape[-1]
    num_k, dv = k.shape[-1], v.shape[1]
    width = _padded_width(d, kh, kw, dv)
    dtype = q.dtype
    q_aug = torch.cat([
        q.transpose(1, 2) * scale,
        rel_h.reshape(n, num_q, kh).to(dtype),
        rel_w.reshape(n, num_q, kw).to(dtype),
        q.new_zeros(n, num_q, width - d - kh - kw),
    ], dim=-1)
    # Key j = r * kw + c of a window sits in key row r and key column c.
    key_rows = torch.arange(num_k, device=q.device) // kw
    key_cols = torch.arange(num_k, device=q.device) % kw
    one_hots = torch.cat([
        F.one_hot(key_rows, kh).to(dtype),
        F.one_hot(key_cols, kw).to(dtype),
        q.new_zeros(num_k, width - d - kh - kw),
    ], dim=-1)
    k_aug = torch.cat([k.transpose(1, 2).to(dtype), one_hots.expand(n, num_k, width - d)], dim=-1)
    v_aug = torch.cat([v.transpose(1, 2), v.new_zeros(n, num_k, width - dv)], dim=-1)
    out = F.scaled_dot_product_attention(q_aug.unsqueeze(1), k_aug.unsqueeze(1), v_aug.unsqueeze(1), scale=1.0)
    return out[:, 0, :, :dv].transpose(1, 2)
