"""Pretrained weights checked where timm will look, before its loader runs: clear failures (docs/hub.md)."""
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional
from zipfile import BadZipFile, is_zipfile

import torch
import torch.nn as nn
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open
from timm.models import resolve_pretrained_cfg
from timm.models._builder import _resolve_pretrained_source
from timm.models._helpers import _torch_load
from timm.models._hub import _PREFERRED_FILES, download_from_hf, load_cfg_from_json

__all__ = ['PretrainedWeightsError', 'build_pretrained', 'checkpoint_problem', 'hub_problem', 'num_classes_conflict',
           'warn_if_classifier_dropped']

LOCAL_HINT = (
    "To load weights you have locally: timm.create_model('{arch}', pretrained=True, pretrained_cfg_overlay=dict("
    "file='/path/to/model.safetensors')) (a .pth checkpoint works too; add num_classes=N to the overlay if its "
    "classifier is not 1000-way), or timm.create_model('local-dir:/path/to/folder', pretrained=True) for a folder "
    "written by timm.models.save_for_hf / `timm-halo hub-export`.")
CONVERT_HINT = (
    "If you trust the file, convert it once to plain tensors and load that instead: ckpt = torch.load(path, "
    "weights_only=False); sd = ckpt.get('state_dict', ckpt); safetensors.torch.save_file({k: v.contiguous() for k, "
    "v in sd.items()}, 'model.safetensors') (or torch.save(sd, 'model.pth') for a plain state dict).")
_HUB_FILES = ('model.safetensors', 'pytorch_model.bin')  # timm's order when a repo names no file
# torch's refusal names the global: 'Unsupported global: GLOBAL posix.mkdir ...', older: 'Unsupported class x.y'
_REFUSAL = re.compile(r'(?:GLOBAL|Unsupported class) ([\w.]+)')


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be found, read, or matched to the model; the message says which and why."""


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def checkpoint_problem(path: str) -> Optional[str]:
    """Why timm's reader (safetensors, or torch.load with weights_only=True) would fail on ``path``, else None."""
    path = str(path)
    if not os.path.isfile(path):
        return ("it is a folder; use timm.create_model('local-dir:<folder>', pretrained=True) for a folder"
                if os.path.isdir(path) else 'no such file')
    try:
        # safetensors: the header only; else timm's weights-only reader (a zip's tensors are only mapped)
        safe_open(path, 'pt') if path.endswith('.safetensors') else _torch_load(path, mmap=is_zipfile(path))
        return None
    except SafetensorError as e:
        return f'it is not a valid safetensors file (truncated or corrupt?): {e}'
    except OSError as e:
        return f'it could not be read: {type(e).__name__}: {e}'
    except Exception as e:
        # timm's reader calls every unpickling error a refusal (its message lists the globals where torch can, for a
        # zip file): it is one where torch named a global, else the file is damaged
        error = e.__cause__ if isinstance(e.__cause__, pickle.UnpicklingError) else e
        if refused := list(dict.fromkeys(_REFUSAL.findall(str(error)))):
            return (f'{" ".join(str(e).split())} torch.load(weights_only=True) refused {", ".join(refused)}: it is a '
                    'pickle that references Python objects other than tensors (unpickling can run arbitrary code). '
                    + CONVERT_HINT)
        damaged = (isinstance(error, (EOFError, BadZipFile, pickle.UnpicklingError)) or 'zip archive' in str(e)
                   or 'PytorchStreamReader' in str(e))  # torch's zip reader raises a RuntimeError
        what = ('it could not be read as a checkpoint (truncated or corrupt?): it is neither a safetensors file nor a '
                'readable torch.save checkpoint' if damaged else 'torch.load(weights_only=True) failed on it')
        return f'{what} ({type(error).__name__}: {" ".join(str(error).split())})'


def hub_problem(exc: Exception) -> str:
    """What huggingface_hub's error means; it blames the connection for a file missing from the cache even offline."""
    if isinstance(exc, LocalEntryNotFoundError):
        how = ('HF_HUB_OFFLINE is set, so nothing was downloaded' if hf_constants.is_offline_mode()
               else 'it could not be downloaded (no connection?)')
        return f'it is not in the local Hugging Face cache ({hf_constants.HF_HUB_CACHE}) and {how}'
    return f'{type(exc).__name__}: {exc}'  # its own words: a gated, missing or private repo, no such file


def build_pretrained(build: Callable[[], nn.Module], variant: str, pretrained_cfg: Any = None,
                     pretrained_cfg_overlay: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Check the weights timm is about to load for ``variant``, then run ``build()``; PretrainedWeightsError."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg, pretrained_cfg_overlay).to_dict()
    arch = cfg.get('architecture') or variant
    kind, loc = _resolve_pretrained_source(cfg)  # where timm's loader will look
    hint = '\n' + LOCAL_HINT.format(arch=arch)
    if not kind:
        name = f"{arch}.{cfg['tag']}" if cfg.get('tag') else arch
        raise PretrainedWeightsError(f"No pretrained weights are available for {arch}: its pretrained cfg '{name}' "
                                     f'names no weight file, and timm.list_models(pretrained=True) lists the models '
                                     f'that have some.{hint}')
    if kind == 'hf-hub':
        loc = (loc[0], loc[1:]) if isinstance(loc, tuple) else (loc, _HUB_FILES)
    where = (f"Hugging Face Hub repo '{loc[0]}' (looked for {', then '.join(loc[1])})" if kind == 'hf-hub' else
             {'local-dir': "local folder '{}'", 'file': "file '{}'", 'url': 'URL {}',
              'state_dict': 'the state_dict given in pretrained_cfg'}.get(kind, '').format(loc))
    failed = f'Could not load pretrained weights for {arch} from {where}'
    path, config = (loc if kind == 'file' else None), None
    for name in loc[1] if kind == 'hf-hub' else ():  # the first file the repo has, into the HF cache
        try:
            path = download_from_hf(loc[0], name)
            config = Path(path).parent / 'config.json'  # in the snapshot folder
            break
        except Exception as e:  # EntryNotFoundError (not there, or not cached offline): try the next name
            if not isinstance(e, EntryNotFoundError) or name == loc[1][-1]:
                raise PretrainedWeightsError(f'{failed}: {hub_problem(e)}{hint}') from e
    if kind == 'local-dir':  # the file timm picks (where there is none, timm's error says so)
        path = next((p for p in (Path(loc) / f for f in _PREFERRED_FILES) if p.is_file()), None)
        config = Path(loc) / 'config.json'
    if problem := checkpoint_problem(path) if path else None:
        raise PretrainedWeightsError(f'{failed}: {problem}' + (hint if problem == 'no such file' else ''))
    if cfg.get('source') in ('hf-hub', 'local-dir') and config.is_file():  # an 'hf-hub:' / 'local-dir:' model
        if conflict := num_classes_conflict(load_cfg_from_json(config), f"config.json of {where.split(' (')[0]}"):
            warnings.warn(conflict, UserWarning, stacklevel=5)  # user -> timm.create_model -> entrypoint -> here
    try:
        return build()
    except PretrainedWeightsError as e:  # raised by the checkpoint filter: the weights do not fit the model
        raise PretrainedWeightsError(f'{failed}: {e}') from e


def num_classes_conflict(config: Any, where: str) -> Optional[str]:
    """A warning where config.json disagrees with itself on the class count (timm then drops the classifier)."""
    if not isinstance(config, dict) or not isinstance(config.get('pretrained_cfg'), dict):
        return None  # timm's older flat layout: a single num_classes
    model_args = config['model_args'] if isinstance(config.get('model_args'), dict) else {}
    top, nested = config.get('num_classes'), config['pretrained_cfg'].get('num_classes')
    built = model_args.get('num_classes')
    values = {n: v for n, v in (('num_classes', top), ('pretrained_cfg.num_classes', nested),
                                ('model_args.num_classes', built)) if _is_count(v)}
    if len(set(values.values())) < 2:
        return None
    weights = top if _is_count(top) else nested
    msg = f'{where} disagrees on the number of classes: ' + ', '.join(f'{n}={v}' for n, v in values.items()) + '. '
    if _is_count(top) and _is_count(nested) and top != nested:
        msg += (f'timm uses the top-level num_classes={top} as the class count of the weights and ignores '
                f'pretrained_cfg.num_classes={nested}. ')
    if _is_count(built) and _is_count(weights) and built != weights:
        msg += (f'The model is built with model_args.num_classes={built} classes (unless num_classes is passed), so '
                f'with pretrained=True timm discards the weights\' classifier ({built} != {weights}) and '
                f'initialises a new random {built}-way one. ')
    return msg + ("Fix config.json: set all of them to the number of outputs of the weights' classifier "
                  "(head.fc.weight.shape[0]).")


def warn_if_classifier_dropped(state_dict: Dict[str, Any], model: nn.Module) -> None:
    """Warn where timm will discard a checkpoint's classifier that fits the model (the cfg's count differs)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    name, cfg_classes, built = cfg.get('classifier'), cfg.get('num_classes'), getattr(model, 'num_classes', None)
    weight = state_dict.get(f'{name}.weight') if isinstance(name, str) else None  # a HaloNet has one: head.fc
    if (_is_count(cfg_classes) and _is_count(built) and built != cfg_classes and isinstance(weight, torch.Tensor)
            and weight.ndim >= 1 and weight.shape[0] == built):
        warnings.warn(f"The weights' classifier ({name}) has {built} classes, as the model has, but the pretrained "
                      f'cfg says num_classes={cfg_classes}; timm goes by the cfg, so it discards this classifier and '
                      f"initialises a new random {built}-way one. To keep it, give the weights' count: "
                      f'pretrained_cfg_overlay=dict(file=..., num_classes={built}), or fix num_classes in config.json.',
                      UserWarning, stacklevel=2)
