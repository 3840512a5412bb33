"""Run timm's own halo models (and their pretrained weights) on timm-halo's kernels.

``accelerate(model)`` turns every ``timm.layers.halo_attn.HaloAttn`` inside ``model`` into a ``TimmHaloAttn``
in place, by changing the instance's class: parameters, buffers, hooks, the state dict and its keys stay as they
are, and the answers stay timm's (same maths, another kernel). Nothing else in the model changes.

Opt-in for unmodified timm scripts (train.py, validate.py, benchmark.py, inference.py): with
``TIMM_HALO_ACCELERATE=1`` in the environment, importing timm_halo (which the timm plugin autoload does as soon as
timm is imported) makes timm's attention factory (``get_attn('halo')``, used by ByobNet) hand out
``TimmHaloAttn``, so every halo model built afterwards is accelerated. Off by default.

Saying what it did: ``accelerate`` logs one INFO line (model and count) and sets ``model.timm_halo_accelerated``
(the count); with the variable set, ``timm.create_model`` logs the same line for each model it builds with
``TimmHaloAttn`` and sets the same attribute. timm's scripts configure logging at INFO, so the line shows there;
elsewhere, read the attribute or ``logging.basicConfig(level=logging.INFO)``. A model with no ``HaloAttn`` at
all gets a warning from ``accelerate``: nothing to accelerate is usually a mistake.
"""
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
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    arch = cfg.get('architecture') if isinstance(cfg, dict) else None
    if not arch:
        return type(model).__name__
    return f"{arch}{'.' + cfg['tag'] if cfg.get('tag') else ''} ({type(model).__name__})"


def accelerate(model: nn.Module, attn_impl: Optional[str] = None) -> nn.Module:
    """Swap every ``timm.layers.halo_attn.HaloAttn`` of ``model`` (the model itself included) for
    ``TimmHaloAttn`` in place and return ``model``.

    Says what it did: logs (``INFO``, logger ``timm_halo.accelerate``) one line naming the model and the count, and
    sets ``model.timm_halo_accelerated`` to the number of its layers that now run on timm-halo kernels (those
    swapped before included). Warns when the model has no ``HaloAttn`` at all.

    Only instances of ``HaloAttn`` itself are swapped (a subclass may have its own forward). ``attn_impl`` picks
    the kernel as ``HaloAttention``'s argument does (``None``: ``TIMM_HALO_ATTN_IMPL``, else ``'auto'``); given
    explicitly, it also applies to layers accelerated before.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'accelerate expects a torch.nn.Module, got {type(model).__name__}')
    impl = resolve_impl_name(attn_impl)
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
    setattr(model, COUNT_ATTR, swapped + already)
    _logger.info('timm_halo.accelerate: %d HaloAttn layer(s) of %s now run on timm-halo kernels%s', swapped,
                 _model_name(model), f' ({already} already did)' if already else '')
    if not swapped + already:
        warnings.warn(f'timm_halo.accelerate: {_model_name(model)} has no timm HaloAttn layer, so nothing was '
                      'accelerated (only timm.layers.halo_attn.HaloAttn itself is swapped, not a subclass; '
                      "timm-halo's own halonet_h* models need no accelerating)", UserWarning, stacklevel=2)
    return model


def _reporting(create_model: Callable[..., Any]) -> Callable[..., Any]:
    """``timm.create_model`` that, after building, says how many TimmHaloAttn layers the model has (if any): for
    ``TIMM_HALO_ACCELERATE=1``, where the layers come from timm's factory and ``accelerate`` is never called."""
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
    """With ``TIMM_HALO_ACCELERATE=1``, make timm's attention factory build ``TimmHaloAttn`` where it builds
    ``HaloAttn`` (patched on the module: ``timm.layers.create_attn`` is also the name of its function), and make
    ``timm.create_model`` report it. Scripts bind ``from timm.models import create_model`` after ``import timm``
    has loaded this plugin, so they get the reporting one."""
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
