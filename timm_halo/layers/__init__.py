from .broadcast import attend_broadcast
from .fused_cpu import attend_fused
from .halo_attention import HaloAttention
from .kernels import ATTN_IMPL_ENV, ATTN_IMPLS
from .sdpa import attend_sdpa
from .tiled import attend_tiled
from .windows import gather_windows, unfold_windows

__all__ = ['ATTN_IMPLS', 'ATTN_IMPL_ENV', 'HaloAttention', 'attend_broadcast', 'attend_fused', 'attend_sdpa',
           'attend_tiled', 'gather_windows', 'unfold_windows']
