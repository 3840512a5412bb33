"""Pretrained weights: found where timm will look and checked cheaply before timm's loader runs, so that a failure
names the architecture, the source and the reason (``PretrainedWeightsError``); docs/hub.md lists the cases."""
import argparse
import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple
from zipfile import BadZipFile, is_zipfile

import huggingface_hub
import torch
import torch.nn as nn
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors import SafetensorError, safe_open
from timm.models import resolve_pretrained_cfg
from timm.models._builder import _resolve_pretrained_source
from timm.models._hub import hf_split

__all__ = ['PretrainedWeightsError', 'build_pretrained', 'checkpoint_problem', 'hub_download', 'hub_problem',
           'num_classes_conflict', 'torch_load_weights_only', 'warn_if_classifier_dropped']

LOCAL_HINT = (
    "To load weights you have locally: timm.create_model('{arch}', pretrained=True, "
    "pretrained_cfg_overlay=dict(file='/path/to/model.safetensors')) (a .pth checkpoint works too; add "
    "num_classes=N to the overlay if its classifier is not 1000-way), or "
    "timm.create_model('local-dir:/path/to/folder', pretrained=True) for a folder written by "
    "timm.models.save_for_hf / `timm-halo hub-export`.")
CONVERT_HINT = (
    'If you trust the file, convert it once to plain tensors and load that instead: '
    "ckpt = torch.load(path, weights_only=False); sd = ckpt.get('state_dict', ckpt); "
    "safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors') "
    "(or torch.save(sd, 'model.pth') for a plain state dict).")
_HUB_FILES = ('model.safetensors', 'pytorch_model.bin')  # timm's order when a repo names no file
_DIR_FILES = ('model.safetensors', 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth')
# torch's refusal names the global: 'Unsupported global: GLOBAL posix.mkdir ...', older: 'Unsupported class x.y'
_REFUSAL = re.compile(r'(?:GLOBAL|Unsupported class) ([\w.]+)')


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be found, read, or matched to the model; the message says which and why."""


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def torch_load_weights_only(path: str, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, allowing the ``argparse.Namespace`` of timm's train.py
    (as timm's own reader does); ``mmap`` (zip checkpoints only) maps the tensors instead of reading them."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True, **({'mmap': True} if mmap else {}))


def _unsafe_globals(path: str) -> Optional[List[str]]:
    """The globals of a zip checkpoint that weights_only refuses, or None where torch cannot list them (no lister
    before torch 2.6; a damaged file: the load that follows reports it)."""
    lister = getattr(torch.serialization, 'get_unsafe_globals_in_checkpoint', None)
    try:
        return None if lister is None else [g for g in lister(path) if g != 'argparse.Namespace']
    except Exception:
        return None


def _refused(names: List[str], how: str, kind: str = 'a pickle checkpoint') -> str:
    return (f'it is {kind} that references Python objects other than tensors ({", ".join(names)}), and timm-halo '
            f'only loads weights with torch.load(weights_only=True), which {how} (unpickling can run arbitrary '
            'code). ' + CONVERT_HINT)


def _unreadable(e: Exception, corrupt: bool) -> str:
    what = ('it could not be read as a checkpoint (truncated or corrupt?): it is neither a safetensors file nor a '
            'readable torch.save checkpoint' if corrupt else 'torch.load(weights_only=True) failed on it')
    return f'{what} ({type(e).__name__}: {" ".join(str(e).split())})'


def checkpoint_problem(path: str) -> Optional[str]:
    """Why timm's reader (safetensors, or torch.load with weights_only=True) would fail on ``path``, else None."""
    path = str(path)
    if not os.path.isfile(path):
        return ("it is a folder; use timm.create_model('local-dir:<folder>', pretrained=True) for a folder"
                if os.path.isdir(path) else 'no such file')
    try:
        if path.endswith('.safetensors'):
            try:
                with safe_open(path, 'pt'):
                    return None
            except SafetensorError as e:  # a bad header (an OSError is reported below, as it is)
                return f'it is not a valid safetensors file (truncated or corrupt?): {e}'
        zipped = is_zipfile(path)
        names = _unsafe_globals(path) if zipped else None
        if names is not None:
            return _refused(names, 'refuses to create them') if names else None
        torch_load_weights_only(path, mmap=zipped)  # torch < 2.6, an old-format pickle, or garbage: try it
        return None
    except OSError as e:
        return f'it could not be read: {type(e).__name__}: {e}'
    except pickle.UnpicklingError as e:
        refused = list(dict.fromkeys(_REFUSAL.findall(str(e))))
        with open(path, 'rb') as f:
            legacy = torch.serialization.MAGIC_NUMBER.to_bytes(10, 'little') in f.read(16)
        kind = 'an old-format (torch < 1.6) pickle checkpoint' if legacy else 'a pickle checkpoint'
        if refused:
            # torch's long message: the line naming the cause, without its advice to allowlist the global
            line = next(line for line in str(e).splitlines() if _REFUSAL.search(line))
            return _refused(refused, f'refused: {line.strip().split(" Please use")[0]}', kind)
        if legacy:  # torch cannot list this format's globals, and did not name one
            return ('torch.load(weights_only=True) refused this old-format (torch < 1.6) pickle checkpoint: it '
                    'most likely references Python objects other than tensors, which timm-halo does not load '
                    '(unpickling can run arbitrary code), or it is damaged. ' + CONVERT_HINT)
        return _unreadable(e, corrupt=True)
    except (EOFError, BadZipFile) as e:
        return _unreadable(e, corrupt=True)
    except RuntimeError as e:  # torch's zip reader on a damaged archive; anything else is reported as it is
        return _unreadable(e, corrupt='zip archive' in str(e) or 'PytorchStreamReader' in str(e))
    except Exception as e:
        return _unreadable(e, corrupt=False)


def hub_problem(exc: Exception) -> str:
    if isinstance(exc, GatedRepoError):
        return 'the repo is gated: accept its terms on huggingface.co and log in (`hf auth login`)'
    if isinstance(exc, RepositoryNotFoundError):
        return 'the repo does not exist, or it is private and no token with access to it is set'
    if isinstance(exc, LocalEntryNotFoundError):
        if hf_constants.is_offline_mode():
            return (f'it is not in the local Hugging Face cache ({hf_constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE '
                    'is set, so nothing was downloaded')
        return (f'it could not be downloaded (no connection?) and is not in the local Hugging Face cache '
                f'({hf_constants.HF_HUB_CACHE})')
    if isinstance(exc, EntryNotFoundError):
        return 'the repo has no such file'
    return f'{type(exc).__name__}: {exc}'


def hub_download(repo_id: str, filenames: Tuple[str, ...]) -> Tuple[Optional[str], Optional[Exception]]:
    """The first of ``filenames`` that ``repo_id`` (``org/name[@revision]``) has, downloaded into the Hugging Face
    cache (where timm then finds it): (path, None), or (None, the last error)."""
    repo, revision = hf_split(repo_id)
    error: Optional[Exception] = None
    for name in filenames:
        try:
            return huggingface_hub.hf_hub_download(repo, name, revision=revision), None
        except EntryNotFoundError as e:  # not there (or not cached offline): try the next name
            error = e
        except Exception as e:
            return None, e
    return None, error


def _source(cfg: Dict[str, Any]) -> Tuple[str, Any, str]:
    """Where timm's loader will look for weights (timm's own resolution): (kind, location, description)."""
    kind, loc = _resolve_pretrained_source(cfg)
    if kind == 'hf-hub':
        loc = (loc[0], loc[1:]) if isinstance(loc, tuple) else (loc, _HUB_FILES)
        return kind, loc, f"Hugging Face Hub repo '{loc[0]}' (looked for {', then '.join(loc[1])})"
    where = {'local-dir': f"local folder '{loc}'", 'file': f"file '{loc}'", 'url': f'URL {loc}',
             'state_dict': 'the state_dict given in pretrained_cfg'}
    return kind, loc, where.get(kind, '')


def build_pretrained(build: Callable[[], nn.Module], variant: str, pretrained_cfg: Any = None,
                     pretrained_cfg_overlay: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Check the weights timm is about to load for ``variant``, then run ``build()`` (``build_model_with_cfg``
    with ``pretrained=True``); raises PretrainedWeightsError, and lets errors of the model kwargs through."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg, pretrained_cfg_overlay).to_dict()
    arch = cfg.get('architecture') or variant
    kind, loc, where = _source(cfg)
    failed = f'Could not load pretrained weights for {arch} from {where}'
    hint = '\n' + LOCAL_HINT.format(arch=arch)
    if not kind:
        name = f"{arch}.{cfg['tag']}" if cfg.get('tag') else arch
        raise PretrainedWeightsError(
            f"No pretrained weights are available for {arch}: its pretrained cfg '{name}' names no weight file, "
            f'and timm.list_models(pretrained=True) lists the models that have some.{hint}')
    path, config = None, None
    if kind == 'hf-hub':
        path, error = hub_download(*loc)
        if error is not None:
            raise PretrainedWeightsError(f'{failed}: {hub_problem(error)}{hint}') from error
        config = Path(path).parent / 'config.json'  # the snapshot folder: present for an 'hf-hub:' model
    elif kind == 'local-dir':
        path = next((p for p in (Path(loc) / f for f in _DIR_FILES) if p.is_file()), None)  # else timm's error
        config = Path(loc) / 'config.json'
    elif kind == 'file':
        path = loc
    problem = checkpoint_problem(path) if path else None
    if problem:
        raise PretrainedWeightsError(f'{failed}: {problem}' + (hint if problem == 'no such file' else ''))
    if cfg.get('source') in ('hf-hub', 'local-dir') and config is not None and config.is_file():
        what = f"config.json of {where.split(' (')[0]}"
        conflict = num_classes_conflict(json.loads(config.read_text(encoding='utf-8')), what)
        if conflict:
            warnings.warn(conflict, UserWarning, stacklevel=5)  # user -> timm.create_model -> entrypoint -> here
    try:
        return build()
    except PretrainedWeightsError as e:  # raised by the checkpoint filter: the weights do not fit the model
        raise PretrainedWeightsError(f'{failed}: {e}') from e


def num_classes_conflict(config: Any, where: str) -> Optional[str]:
    """A warning when config.json disagrees with itself on the number of classes (timm would then silently
    re-initialise the classifier), else None."""
    if not isinstance(config, dict) or not isinstance(config.get('pretrained_cfg'), dict):
        return None  # timm's older flat layout: a single num_classes
    model_args = config.get('model_args') if isinstance(config.get('model_args'), dict) else {}
    top, nested, built = (config.get('num_classes'), config['pretrained_cfg'].get('num_classes'),
                          model_args.get('num_classes'))
    values = [(name, v) for name, v in (('num_classes', top), ('pretrained_cfg.num_classes', nested),
                                        ('model_args.num_classes', built)) if _is_count(v)]
    if len({v for _, v in values}) < 2:
        return None
    weights = top if _is_count(top) else nested
    msg = f'{where} disagrees on the number of classes: ' + ', '.join(f'{n}={v}' for n, v in values) + '. '
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
    """Warn when timm is about to discard a checkpoint's classifier that fits the model as built (the model's
    num_classes differs from its pretrained cfg's, but the weights' classifier has the model's classes)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    classifier, cfg_classes = cfg.get('classifier'), cfg.get('num_classes')
    built = getattr(model, 'num_classes', None)
    if not classifier or not _is_count(cfg_classes) or not _is_count(built) or built == cfg_classes:
        return
    for name in (classifier,) if isinstance(classifier, str) else tuple(classifier):
        weight = state_dict.get(f'{name}.weight')
        if isinstance(weight, torch.Tensor) and weight.ndim >= 1 and weight.shape[0] == built:
            warnings.warn(
                f"The weights' classifier ({name}) has {built} classes, as the model has, but the pretrained cfg "
                f'says num_classes={cfg_classes}; timm goes by the cfg, so it discards this classifier and '
                f'initialises a new random {built}-way one. To keep it, give the weights\' count: '
                f'pretrained_cfg_overlay=dict(file=..., num_classes={built}), or fix num_classes in config.json.',
                UserWarning, stacklevel=2)
            return
