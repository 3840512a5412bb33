from .halonet import PAPER_PARAMS_M, PAPER_TOP1, HaloNet, halonet_args

__all__ = ['HaloNet', 'halonet_args', 'PAPER_PARAMS_M', 'PAPER_TOP1']
