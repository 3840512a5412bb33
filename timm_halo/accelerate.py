"""Run timm's own halo models (and their pretrained weights) on timm-halo's kernels.

``accelerate(model)`` turns every ``timm.layers.halo_attn.HaloAttn`` inside ``model`` into a ``TimmHaloAttn``
in place, by changing the instance's class: parameters, buffers, hooks, the state dict and its keys stay as they
are, and the answers stay timm's (same maths, another kernel). Nothing else in the model changes.

Opt-in for unmodified timm scripts (train.py, validate.py, benchmark.py, inference.py): with
``TIMM_HALO_ACCELERATE=1`` in the environment, importing timm_halo (which the timm plugin autoload does as soon as
timm is imported) makes timm's attention factory (``get_attn('halo')``, used by ByobNet) hand out
``TimmHaloAttn``, so every halo model built afterwards is accelerated. Off by default.
"""
import importlib
import logging
import os
import warnings
from typing import Optional

import torch.nn as nn
from timm.layers.halo_attn import HaloAttn

from .layers.halo_attention import _resolve_impl_name
from .layers.timm_halo_attn import TimmHaloAttn

__all__ = ['ACCELERATE_ENV', 'TimmHaloAttn', 'accelerate']

ACCELERATE_ENV = 'TIMM_HALO_ACCELERATE'

_logger = logging.getLogger(__name__)


def accelerate(model: nn.Module, attn_impl: Optional[str] = None) -> nn.Module:
    """Swap every ``timm.layers.halo_attn.HaloAttn`` of ``model`` (the model itself included) for
    ``TimmHaloAttn`` in place and return ``model``. Logs (``INFO``) how many layers it swapped.

    Only instances of ``HaloAttn`` itself are swapped (a subclass may have its own forward). ``attn_impl`` picks
    the kernel as ``HaloAttention``'s argument does (``None``: ``TIMM_HALO_ATTN_IMPL``, else ``'auto'``); given
    explicitly, it also applies to layers accelerated before.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'accelerate expects a torch.nn.Module, got {type(model).__name__}')
    impl = _resolve_impl_name(attn_impl)
    swapped = already = 0
    for module in model.modules():
        if type(module) is HaloAttn:
            module.__class__ = TimmHaloAttn  # same fields, parameters and hooks: only forward changes
            module.attn_impl = impl
            swapped += 1
        elif isinstance(module, TimmHaloAttn):
            if attn_impl is not None:
                module.attn_impl = impl
            already += 1
    _logger.info('timm_halo.accelerate: %d HaloAttn layer(s) of %s now run on timm-halo kernels%s', swapped,
                 type(model).__name__, f' ({already} already did)' if already else '')
    return model


def _honour_env() -> None:
    """With ``TIMM_HALO_ACCELERATE=1``, make timm's attention factory build ``TimmHaloAttn`` where it builds
    ``HaloAttn`` (patched on the module: ``timm.layers.create_attn`` is also the name of its function)."""
    value = os.environ.get(ACCELERATE_ENV, '').strip().lower()
    if value in ('1', 'true', 'yes', 'on'):
        importlib.import_module('timm.layers.create_attn').HaloAttn = TimmHaloAttn
        _logger.info('%s=%s: timm halo models are built with TimmHaloAttn', ACCELERATE_ENV, value)
    elif value not in ('', '0', 'false', 'no', 'off'):
        warnings.warn(f'{ACCELERATE_ENV}={value!r} is not understood (use 1 or 0); timm halo models are not '
                      f'accelerated', RuntimeWarning, stacklevel=2)


_honour_env()
