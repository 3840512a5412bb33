"""Windowed attention as fused ``F.scaled_dot_product_attention`` calls, the relative terms folded into q/k.

With ``q'_i = [scale * q_i, Lh[i, :], Lw[i, :]]`` and ``k'_j = [k_j, onehot(row_j), onehot(col_j)]``, ``q'_i . k'_j``
is exactly the logit (``Lh``/``Lw``: the per-axis relative terms with the border mask), so SDPA runs with
``scale=1`` and no mask and every fused backend qualifies. Widths are padded to multiples of 8, autocast inputs
are cast to one dtype, and CUDA calls are split at 65535 windows. Gradients: first order (docs/gpu.md).
"""
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ['CUDA_MAX_WINDOWS_PER_CALL', 'CUDA_PAD_VALUES_FOR_FLASH', 'attend_sdpa']

CUDA_MAX_WINDOWS_PER_CALL = 65535
# fp16/bf16 on CUDA: True pads v to the q'/k' width so that flash attention qualifies. False (measured faster on an
# H100, where SDPA picks cuDNN either way): v padded to a multiple of 8 only. benchmarks/gpu.py measures both.
CUDA_PAD_VALUES_FOR_FLASH = False

_REDUCED = (torch.float16, torch.bfloat16)


def _round8(width: int) -> int:
    return width + (-width) % 8


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``device_type`` where autocast is on there, else None."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
    except (RuntimeError, TypeError):  # a device autocast does not know (meta), or a torch without the argument
        return None
    if hasattr(torch, 'get_autocast_dtype'):
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_gpu_dtype() if device_type == 'cuda' else torch.get_autocast_cpu_dtype()


def _compute_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
                   rel_w: torch.Tensor) -> torch.dtype:
    """The one dtype of q', k', v': the inputs' common dtype, or the autocast dtype where autocast would cast the
    SDPA call anyway (it leaves fp64 alone)."""
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    dtype = torch.promote_types(dtype, torch.promote_types(rel_h.dtype, rel_w.dtype))
    if dtype in (torch.float32, *_REDUCED):
        autocast = _autocast_dtype(q.device.type)
        if autocast is not None:
            return autocast
    return dtype


def _logits_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Relative logits (with the border mask) in ``dtype``; finite if they were finite, whatever the dtypes."""
    if t.dtype == dtype:
        return t
    out = t.to(dtype)
    if torch.finfo(t.dtype).max > torch.finfo(dtype).max:
        # The mask is a quarter of the wider dtype's lowest value: saturate at a quarter of this dtype's range,
        # so a row mask plus a column mask plus a real logit stay finite (as _axis_terms makes them).
        limit = torch.finfo(dtype).max / 4
        out = out.clamp(-limit, limit)
    return out


def _pad_values_default(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type == 'cuda':
        return CUDA_PAD_VALUES_FOR_FLASH and dtype in _REDUCED
    return True  # CPU flash needs equal widths (else the math backend runs); other devices: every backend qualifies


def augment(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rel_h: torch.Tensor,
        rel_w: torch.Tensor,
        scale: float,
        pad_values: Optional[bool] = None,
):
    """q' (N, bq^2, Wqk), k' (N, keys, Wqk), v' (N, keys, Wv) of ``attend_sdpa``, all in one dtype, contiguous."""
    n, d, num_q = q.shape
    kh, kw = rel_h.shape[-1], rel_w.shape[-1]
    num_k, dv = k.shape[-1], v.shape[1]
    dtype = _compute_dtype(q, k, v, rel_h, rel_w)
    if pad_values is None:
        pad_values = _pad_values_default(q.device, dtype)
    qk_width = _round8(d + kh + kw)
    v_width = _round8(dv)
    if pad_values:
        qk_width = v_width = max(qk_width, v_width)
    q_aug = torch.cat([
        (q.transpose(1, 2) * scale).to(dtype),
        _logits_to(rel_h.reshape(n, num_q, kh), dtype),
        _logits_to(rel_w.reshape(n, num_q, kw), dtype),
        q.new_zeros(n, num_q, qk_width - d - kh - kw, dtype=dtype),
    ], dim=-1)
    # Key j = r * kw + c of a window sits in key row r and key column c. Comparisons, not F.one_hot: no bounds
    # check (a device sync on CUDA), one elementwise op for torch.compile.
    keys = torch.arange(num_k, device=q.device)
    one_hots = torch.cat([
        ((keys // kw)[:, None] == torch.arange(kh, device=q.device)[None, :]).to(dtype),
        ((keys % kw)[:, None] == torch.arange(kw, device=q.device)[None, :]).to(dtype),
        q.new_zeros(num_k, qk_width - d - kh - kw, dtype=dtype),
    ], dim=-1)
    k_aug = torch.cat([k.transpose(1, 2).to(dtype), one_hots.expand(n, num_k, qk_width - d)], dim=-1)
    v_aug = torch.cat([v.transpose(1, 2).to(dtype), v.new_zeros(n, num_k, v_width - dv, dtype=dtype)], dim=-1)
    return q_aug, k_aug, v_aug


def _attend(q_aug: torch.Tensor, k_aug: torch.Tensor, v_aug: torch.Tensor) -> torch.Tensor:
    # Windows as the batch, one head: (N, 1, L, W).
    out = F.scaled_dot_product_attention(q_aug.unsqueeze(1), k_aug.unsqueeze(1), v_aug.unsqueeze(1), scale=1.0)
    return out.squeeze(1)


def attend_sdpa(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rel_h: torch.Tensor,
        rel_w: torch.Tensor,
        scale: float,
        pad_values: Optional[bool] = None,
        max_windows: Optional[int] = None,
) -> torch.Tensor:
    """Arguments and result as ``attend_broadcast`` (the result in the dtype SDPA ran in).

    ``pad_values``: pad v to the q'/k' width (flash-eligible) or only to a multiple of 8; None: the device's
    default (see the module docstring). ``max_windows``: windows per SDPA call, more are split into as few calls
    of (nearly) equal size as fit;
    None: ``CUDA_MAX_WINDOWS_PER_CALL`` on CUDA, no limit elsewhere."""
    n, dv = q.shape[0], v.shape[1]
    q_aug, k_aug, v_aug = augment(q, k, v, rel_h, rel_w, scale, pad_values)
    limit = max_windows if max_windows is not None else (CUDA_MAX_WINDOWS_PER_CALL if q.is_cuda else 0)
    if limit and n > limit:
        chunks = (n + limit - 1) // limit  # as few calls as fit, of (nearly) equal sizes
        out = torch.cat([
            _attend(qc, kc, vc)[..., :dv]
            for qc, kc, vc in zip(q_aug.tensor_split(chunks), k_aug.tensor_split(chunks), v_aug.tensor_split(chunks))])
    else:
        out = _attend(q_aug, k_aug, v_aug)[..., :dv]
    return out.transpose(1, 2)
