"""timm's ``HaloAttn`` on our kernels: the same constructor, parameters and answers, a faster forward (its semantics
and how they map onto the kernels: docs/kernels.md; ``timm_halo.accelerate`` swaps existing instances' class)."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from timm.layers.halo_attn import HaloAttn

from .halo_attention import check_image_input, cut_windows
from .kernels import KernelChoice, resolve_impl_name

__all__ = ['TimmHaloAttn']


@register_notrace_module  # a leaf for torch.fx (timm's feature extraction): the shape checks need real sizes
class TimmHaloAttn(KernelChoice, HaloAttn):
    """``HaloAttn`` (its args, plus ``attn_impl`` as ``HaloAttention``'s) with the forward on timm-halo's kernels;
    a height or width not a multiple of ``block_size`` is a ValueError (timm: an assert)."""

    def __init__(self, *args, attn_impl: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.attn_impl = resolve_impl_name(attn_impl)

    # KernelChoice reads ``heads``, ``dim_head``, ``stride`` (query subsampling inside a block: timm's
    # ``block_stride``; 1 with ``avg_down``, which pools after attention) and ``_window_plan`` (timm's windows:
    # pad by the halo on both sides, one window of ``win_size`` every ``block_size``; never cropped).

    @property
    def heads(self) -> int:
        return self.num_heads

    @property
    def dim_head(self) -> int:
        return self.dim_head_qk

    @property
    def stride(self) -> int:
        return self.block_stride

    def _window_plan(self, size: int, blocks: int, crop: bool) -> Tuple[int, int, int, int]:
        """(padding before, padding after, step, length) of the key windows along one axis."""
        return self.halo_size, self.halo_size, self.block_size, self.win_size

    def extra_repr(self) -> str:
        return (f'heads={self.num_heads}, dim_head_qk={self.dim_head_qk}, dim_head_v={self.dim_head_v}, '
                f'block_size={self.block_size}, halo_size={self.halo_size}, block_stride={self.block_stride}, '
                f'scale_pos_embed={self.scale_pos_embed}, attn_impl={self.attn_impl!r}')

    def _check_input(self, x: torch.Tensor) -> None:
        check_image_input(x, self.q.in_channels, self.pos_embed.height_rel.dtype, 'TimmHaloAttn')
        H, W = x.shape[2], x.shape[3]
        if H % self.block_size != 0 or W % self.block_size != 0:
            raise ValueError(f'TimmHaloAttn (timm HaloAttn semantics) needs height and width divisible by block_size '
                             f'{self.block_size}, got {H} x {W}; for a timm halo model choose an input size whose '
                             f'feature maps at every halo stage are multiples of the block size')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        impl, gather_op, _, _ = self._call_plan(x)  # timm's windows are never cropped

        B, _, H, W = x.shape
        heads, d, dv = self.num_heads, self.dim_head_qk, self.dim_head_v
        b, h, win, bq = self.block_size, self.halo_size, self.win_size, self.block_size_ds
        nh, nw = H // b, W // b
        n = B * heads * nh * nw

        # Queries per block, channels first: (N, d, bq * bq); the strided q conv (if any) has subsampled them.
        q = self.q(x).reshape(B, heads, d, nh, bq, nw, bq).permute(0, 1, 3, 5, 2, 4, 6).reshape(n, d, bq * bq)
        # Per-axis relative terms: entry [i, j] = q_i . R[j - i + win - 1] (i: the query inside its block, j: the
        # key slot of the window). timm attends the padded keys too, so there is no mask.
        rows = torch.arange(win, device=x.device)[None, :] - torch.arange(bq, device=x.device)[:, None] + win - 1
        table_h, table_w = self.pos_embed.height_rel, self.pos_embed.width_rel
        if self.scale_pos_embed:  # scale * (q . k + rel): the scale goes on the (small) tables
            table_h, table_w = table_h * self.scale, table_w * self.scale
        q_blocks = q.view(n, d, bq, bq)
        rel_h = torch.einsum('ndyx,ykd->nyxk', q_blocks, table_h[rows])
        rel_w = torch.einsum('ndyx,xkd->nyxk', q_blocks, table_w[rows])

        # Keys and values: projected, then zero-padded by the halo (padded keys are attended with k = v = 0).
        plan = self._window_plan(H, nh, False)
        k, v = cut_windows(F.pad(self.kv(x), [h, h, h, h]), heads, d, plan, plan, gather_op)

        out = self._attend(impl, q, k, v, [rel_h, rel_w])
        out = out.reshape(B, heads, nh, nw, dv, bq, bq).permute(0, 1, 4, 2, 5, 3, 6)
        return self.pool(out.reshape(B, heads * dv, nh * bq, nw * bq))
