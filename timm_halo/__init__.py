"""timm-halo: HaloNet backbones as a timm plugin; importing it registers ``halonet_h0`` ... ``halonet_h7``."""
from .accelerate import accelerate
from .layers import HaloAttention
from .models import HaloNet

__version__ = '0.1.0'
__all__ = ['HaloAttention', 'HaloNet', '__version__', 'accelerate']
