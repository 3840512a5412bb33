"""Windowed attention as fused ``F.scaled_dot_product_attention`` calls, the relative terms folded into q/k:
``q'_i . k'_j`` with ``q'_i = [scale * q_i, Lh[i, :], Lw[i, :]]``, ``k'_j = [k_j, onehot(row_j), onehot(col_j)]`` is
exactly the logit, so SDPA runs with no mask and every fused backend qualifies (docs/kernels.md, SDPA)."""
import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .broadcast import key_one_hots

__all__ = ['CUDA_MAX_WINDOWS_PER_CALL', 'CUDA_PAD_VALUES_FOR_FLASH', 'attend_sdpa']

CUDA_MAX_WINDOWS_PER_CALL = 65535
# fp16/bf16 on CUDA: True pads v to the q'/k' width so that flash attention qualifies. False (measured faster on an
# H100, where SDPA picks cuDNN either way): v padded to a multiple of 8 only. benchmarks/gpu.py measures both.
CUDA_PAD_VALUES_FOR_FLASH = False

_REDUCED = (torch.float16, torch.bfloat16)


def _round8(width: int) -> int:
    return width + (-width) % 8


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``device_type`` where autocast is on there, else None."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except RuntimeError:  # a device autocast does not know (e.g. meta): no autocast there
        return None


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The one dtype of q', k', v': the inputs' common dtype, or the autocast dtype where autocast would cast the
    SDPA call anyway (it leaves fp64 alone)."""
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    autocast = autocast_dtype(tensors[0].device.type) if dtype in (torch.float32, *_REDUCED) else None
    return dtype if autocast is None else autocast


def _logits_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Relative logits (with the border mask) in ``dtype``; finite if they were finite, whatever the dtypes."""
    out = t.to(dtype)  # t itself where the dtypes agree
    if torch.finfo(t.dtype).max > torch.finfo(dtype).max:
        # The mask is a quarter of the wider dtype's lowest value: saturate at a quarter of this dtype's range,
        # so a row mask plus a column mask plus a real logit stay finite (as _axis_terms makes them).
        out = out.clamp(-torch.finfo(dtype).max / 4, torch.finfo(dtype).max / 4)
    return out


def _pad_values_default(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type == 'cuda':
        return CUDA_PAD_VALUES_FOR_FLASH and dtype in _REDUCED
    return True  # CPU flash needs equal widths (else the math backend runs); other devices: every backend qualifies


def augment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, scale: float,
            pad_values: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q' (N, bq^2, Wqk), k' (N, keys, Wqk), v' (N, keys, Wv) of ``attend_sdpa``, all in one dtype, contiguous."""
    n, d, num_q = q.shape
    kh, kw = rel_h.shape[-1], rel_w.shape[-1]
    num_k, dv = k.shape[-1], v.shape[1]
    dtype = _compute_dtype(q, k, v, rel_h, rel_w)
    qk_width, v_width = _round8(d + kh + kw), _round8(dv)
    if pad_values if pad_values is not None else _pad_values_default(q.device, dtype):
        qk_width = v_width = max(qk_width, v_width)
    q_aug = torch.cat([
        (q.transpose(1, 2) * scale).to(dtype),
        _logits_to(rel_h.reshape(n, num_q, kh), dtype),
        _logits_to(rel_w.reshape(n, num_q, kw), dtype),
        q.new_zeros(n, num_q, qk_width - d - kh - kw, dtype=dtype),
    ], dim=-1)
    one_hots = F.pad(key_one_hots(kh, kw, dtype, q.device), [0, qk_width - d - kh - kw])
    k_aug = torch.cat([k.transpose(1, 2).to(dtype), one_hots.expand(n, num_k, qk_width - d)], dim=-1)
    v_aug = torch.cat([v.transpose(1, 2).to(dtype), v.new_zeros(n, num_k, v_width - dv, dtype=dtype)], dim=-1)
    return q_aug, k_aug, v_aug


def attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                scale: float, pad_values: Optional[bool] = None, max_windows: Optional[int] = None) -> torch.Tensor:
    """Arguments and result as ``attend_broadcast`` (the result in the dtype SDPA ran in). ``pad_values``: pad v to
    the q'/k' width (flash-eligible) or to a multiple of 8, None: the device's default. ``max_windows``: windows per
    SDPA call, more are split into as few calls of (nearly) equal size as fit; None: ``CUDA_MAX_WINDOWS_PER_CALL`` on
    CUDA, no limit elsewhere."""
    n, dv = q.shape[0], v.shape[1]
    limit = max_windows if max_windows is not None else (CUDA_MAX_WINDOWS_PER_CALL if q.is_cuda else 0)
    chunks = (n + limit - 1) // limit if limit and n > limit else 1  # as few calls as fit, of (nearly) equal sizes
    # Windows as the batch, one head: (N, 1, L, W).
    outs = [F.scaled_dot_product_attention(qc[:, None], kc[:, None], vc[:, None], scale=1.0)[:, 0, :, :dv]
            for qc, kc, vc in zip(*[t.tensor_split(chunks) for t in augment(q, k, v, rel_h, rel_w, scale, pad_values)])]
    return (outs[0] if chunks == 1 else torch.cat(outs)).transpose(1, 2)
