from .halo_attention import HaloAttention, attend_broadcast

__all__ = ['HaloAttention', 'attend_broadcast']
