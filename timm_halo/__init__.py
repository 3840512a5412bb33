"""timm-halo: HaloNet local self-attention backbones as a timm plugin.

Importing this package registers ``halonet_h0`` ... ``halonet_h7`` with timm's model factory.
"""
from .accelerate import accelerate
from .layers import HaloAttention
from .models import HaloNet

__version__ = '0.1.0'
__all__ = ['HaloAttention', 'HaloNet', '__version__', 'accelerate']
