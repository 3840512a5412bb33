"""timm's halo models on our kernels: ``accelerate(model)``, or ``TIMM_HALO_ACCELERATE=1`` (docs/accelerate.md)."""
import functools
import importlib
import logging
import os
import sys
import warnings
from typing import Any, Callable, Optional

import torch.nn as nn
from timm.layers.halo_attn import HaloAttn

from .layers.kernels import resolve_impl_name
from .layers.timm_halo_attn import TimmHaloAttn

__all__ = ['ACCELERATE_ENV', 'COUNT_ATTR', 'TimmHaloAttn', 'accelerate']

ACCELERATE_ENV = 'TIMM_HALO_ACCELERATE'
COUNT_ATTR = 'timm_halo_accelerated'  # set on the model: how many of its layers run on timm-halo kernels

_logger = logging.getLogger(__name__)


def _model_name(model: nn.Module) -> str:
    """timm's name of the model (``halonet26t.a1h_in1k``) and its class, or the class alone."""
    cfg = getattr(model, 'pretrained_cfg', None)
    arch = cfg.get('architecture') if isinstance(cfg, dict) else None
    name = type(model).__name__
    return f"{arch}{'.' + cfg['tag'] if cfg.get('tag') else ''} ({name})" if arch else name


def accelerate(model: nn.Module, attn_impl: Optional[str] = None) -> nn.Module:
    """``model`` with each timm ``HaloAttn`` (not a subclass) swapped in place for ``TimmHaloAttn`` (docs)."""
    # docs/accelerate.md; a given attn_impl also applies to layers swapped before
    if not isinstance(model, nn.Module):
        raise TypeError(f'accelerate expects a torch.nn.Module, got {type(model).__name__}')
    impl, swapped, already = resolve_impl_name(attn_impl), 0, 0
    for module in model.modules():
        if type(module) is HaloAttn:  # the same fields, parameters and hooks: only forward changes
            module.__class__, module.attn_impl, swapped = TimmHaloAttn, impl, swapped + 1
        elif isinstance(module, TimmHaloAttn):
            module.attn_impl, already = impl if attn_impl is not None else module.attn_impl, already + 1
    setattr(model, COUNT_ATTR, swapped + already)
    _logger.info('timm_halo.accelerate: %d HaloAttn layer(s) of %s now run on timm-halo kernels%s', swapped,
                 _model_name(model), f' ({already} already did)' if already else '')
    if not swapped + already:
        warnings.warn(f'timm_halo.accelerate: {_model_name(model)} has no timm HaloAttn layer, so nothing was '
                      'accelerated (only timm.layers.halo_attn.HaloAttn itself is swapped, not a subclass; '
                      "timm-halo's own halonet_h* models need no accelerating)", UserWarning, stacklevel=2)
    return model


def _reporting(create_model: Callable[..., Any]) -> Callable[..., Any]:
    """``timm.create_model`` that reports (as ``accelerate`` does) the TimmHaloAttn layers a model has."""
    @functools.wraps(create_model)
    def create_and_report(model_name: str, *args: Any, **kwargs: Any) -> Any:
        model = create_model(model_name, *args, **kwargs)
        count = sum(isinstance(m, TimmHaloAttn) for m in model.modules()) if isinstance(model, nn.Module) else 0
        if count:
            setattr(model, COUNT_ATTR, count)
            _logger.info('timm_halo: %d HaloAttn layer(s) of %s run on timm-halo kernels (%s=1)', count,
                         _model_name(model), ACCELERATE_ENV)
        return model

    create_and_report.__wrapped_by_timm_halo__ = True
    return create_and_report


def _honour_env() -> None:
    """With ``TIMM_HALO_ACCELERATE=1``, timm's attention factory builds ``TimmHaloAttn`` for ``HaloAttn``."""
    # and timm.create_model reports it (scripts bind it after `import timm` loaded this plugin); patched on the
    # module: ``timm.layers.create_attn`` is also the name of its function
    value = os.environ.get(ACCELERATE_ENV, '').strip().lower()
    if value in ('1', 'true', 'yes', 'on'):
        importlib.import_module('timm.layers.create_attn').HaloAttn = TimmHaloAttn
        for module in (sys.modules.get('timm'), sys.modules.get('timm.models')):
            create_model = getattr(module, 'create_model', None)
            if create_model is not None and not getattr(create_model, '__wrapped_by_timm_halo__', False):
                module.create_model = _reporting(create_model)
        _logger.info('%s=%s: timm halo models are built with TimmHaloAttn', ACCELERATE_ENV, value)
    elif value not in ('', '0', 'false', 'no', 'off'):
        warnings.warn(f'{ACCELERATE_ENV}={value!r} is not understood (use 1 or 0); timm halo models are not '
                      f'accelerated', RuntimeWarning, stacklevel=2)


_honour_env()
