"""Pretrained weights in and out: the Hugging Face Hub, local folders and checkpoint files.

Loading and publishing go through timm's own machinery (``timm.create_model('hf-hub:...' | 'local-dir:...')``,
``pretrained_cfg_overlay=dict(file=...)``, ``timm.models.save_for_hf`` / ``push_to_hf_hub``). This module adds
what timm leaves to the model author:

* clear errors: a failed pretrained load names the architecture, the repo/file it looked for, why it failed,
  and how to load a local file instead (``PretrainedWeightsError``); a config.json whose class counts disagree
  (so that timm would silently re-initialise the classifier) gets a ``UserWarning``;
* cfgs for weights that are planned but not yet published (``UnpublishedCfg``): they carry their ``hf_hub_id``
  but timm does not count them as having weights, so ``timm.list_models(pretrained=True)`` stays honest;
* a model card for ``push_to_hf_hub(model_card=...)`` (``model_card``);
* ``export_for_hub`` / ``inspect_hub_model`` and the ``timm-halo hub-export`` / ``hub-inspect`` commands, which
  check config.json (``check_hub_config``) and their arguments first and fail with one line, not a traceback.

Naming on the Hub: the project's own weights go to ``hf-hub:timm-halo/<model>.<tag>`` (timm's ``org/arch.tag``
convention under our org; timm's ``hf_hub_id='timm/'`` auto-completion only applies to the ``timm`` org).
"""
import argparse
import copy
import json
import os
import pickle
import sys
import warnings
import zipfile
from pathlib import Path
from types import CodeType, TracebackType
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import huggingface_hub
import torch
import torch.nn as nn
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError
from timm.models import PretrainedCfg, get_arch_pretrained_cfgs, load_state_dict, resolve_pretrained_cfg
from timm.models import _builder as timm_builder
from timm.models import _helpers as timm_helpers
from timm.models import _hub as timm_hub

__all__ = [
    'HF_HUB_ORG',
    'PretrainedWeightsError',
    'UnpublishedCfg',
    'build_pretrained',
    'read_checkpoint',
    'describe_model',
    'model_card',
    'export_for_hub',
    'inspect_hub_model',
    'check_hub_config',
    'num_classes_conflict',
    'halonet_models',
    'warn_if_classifier_dropped',
    'add_cli_commands',
]

# Hub organisation for the project's own weights: hf-hub:timm-halo/<model>.<tag>
HF_HUB_ORG = 'timm-halo'

PAPER_URL = 'https://arxiv.org/abs/2103.12731'
PAPER_TITLE = 'Scaling Local Self-Attention for Parameter Efficient Visual Backbones'
PAPER_BIBTEX = """@inproceedings{vaswani2021halonet,
  title={Scaling Local Self-Attention for Parameter Efficient Visual Backbones},
  author={Vaswani, Ashish and Ramachandran, Prajit and Srinivas, Aravind and Parmar, Niki and
          Hechtman, Blake and Shlens, Jonathon},
  booktitle={IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2021}
}"""

_LOCAL_HINT = (
    "To load weights you have locally: timm.create_model('{arch}', pretrained=True, "
    "pretrained_cfg_overlay=dict(file='/path/to/model.safetensors')) (a .pth checkpoint works too; add "
    "num_classes=N to the overlay if its classifier is not 1000-way), or "
    "timm.create_model('local-dir:/path/to/folder', pretrained=True) for a folder written by "
    "timm.models.save_for_hf / `timm-halo hub-export`."
)


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be found, read, or matched to the model; the message says which and why."""


class UnpublishedCfg(PretrainedCfg):
    """A pretrained cfg naming where weights *will* be published, which timm must not count as weights yet.

    timm marks a cfg "has weights" as soon as it has an ``hf_hub_id``; that would list the model under
    ``timm.list_models(pretrained=True)`` and make it the architecture's default tag before any file exists.
    Publishing the weights means replacing this class by a plain cfg dict (see ``PUBLISHED_WEIGHTS`` in
    ``timm_halo.models.halonet``).
    """

    @property
    def has_weights(self) -> bool:
        return False


# --------------------------------------------------------------------------------------------------------------
# Loading with clear errors
# --------------------------------------------------------------------------------------------------------------

def _weights_source(cfg: Dict[str, Any]) -> Tuple[str, Any]:
    """Where timm's loader will look for weights, in its own order of priority: (kind, location)."""
    if cfg.get('source') == 'hf-hub':
        return 'hf-hub', (cfg.get('hf_hub_id'), cfg.get('hf_hub_filename'))
    if cfg.get('source') == 'local-dir':
        return 'local-dir', cfg.get('file')
    if cfg.get('state_dict') is not None:
        return 'state_dict', None
    if cfg.get('file'):
        return 'file', cfg['file']
    if cfg.get('hf_hub_id'):
        return 'hf-hub', (cfg['hf_hub_id'], cfg.get('hf_hub_filename'))
    if cfg.get('url'):
        return 'url', cfg['url']
    return '', None


def _describe_source(kind: str, loc: Any) -> str:
    if kind == 'hf-hub':
        repo, filename = loc
        files = filename or 'model.safetensors, then pytorch_model.bin'
        return f"Hugging Face Hub repo '{repo}' (looked for {files})"
    if kind == 'local-dir':
        return f"local folder '{loc}'"
    if kind == 'file':
        return f"file '{loc}'"
    if kind == 'url':
        return f'URL {loc}'
    return 'the state_dict given in pretrained_cfg'


def _frames(exc: BaseException) -> List[CodeType]:
    tb: Optional[TracebackType] = exc.__traceback__
    codes = []
    while tb is not None:
        codes.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    return codes


# Functions of timm's loader: an exception raised below one of them is a weights problem, not a model one.
_LOAD_CODES = (timm_builder.load_pretrained.__code__,)
_READ_CODES = (
    timm_helpers.load_state_dict.__code__,
    timm_hub.load_state_dict_from_hf.__code__,
    timm_hub.load_state_dict_from_path.__code__,
)


def _exception_chain(exc: BaseException) -> List[BaseException]:
    """``exc`` and every exception it was raised from or while handling (``__cause__``, ``__context__``)."""
    chain: List[BaseException] = []
    todo: List[Optional[BaseException]] = [exc]
    while todo:
        e = todo.pop(0)
        if e is not None and not any(e is seen for seen in chain):
            chain.append(e)
            todo += [e.__cause__, e.__context__]
    return chain


def _pickle_checkpoint_path(kind: str, loc: Any) -> Optional[str]:
    """The pickle file timm's loader reads for a weights source (a pickle is only read when no safetensors is)."""
    if kind == 'file':
        return str(loc)
    if kind == 'local-dir' and loc:
        return os.path.join(str(loc), 'pytorch_model.bin')
    if kind == 'hf-hub':
        repo, filename = loc
        cached = huggingface_hub.try_to_load_from_cache(repo, filename or 'pytorch_model.bin')
        return cached if isinstance(cached, str) else None
    return None


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f'{module}.{name}')


def _pickle_kind(path: Optional[str]) -> str:
    """'zip' (torch.save since torch 1.6), 'legacy' (older torch.save), or '' (neither, or unreadable)."""
    if not path or not os.path.isfile(path):
        return ''
    if zipfile.is_zipfile(path):
        return 'zip'
    try:
        with open(path, 'rb') as f:
            return 'legacy' if _NoGlobals(f).load() == torch.serialization.MAGIC_NUMBER else ''
    except Exception:
        return ''


def _unsafe_globals(path: str) -> Optional[List[str]]:
    """Globals a zip checkpoint's pickle references that torch.load(weights_only=True) does not allow, or None
    when torch cannot list them (no such API, or the archive is damaged)."""
    get = getattr(torch.serialization, 'get_unsafe_globals_in_checkpoint', None)  # torch >= 2.5
    if get is None:
        return None
    try:
        return [str(g) for g in get(path)]
    except Exception:
        return None


_CONVERT_HINT = (
    'If you trust the file, convert it once to plain tensors and load that instead: '
    "ckpt = torch.load(path, weights_only=False); sd = ckpt.get('state_dict', ckpt); "
    "safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors') "
    "(or torch.save(sd, 'model.pth') for a plain state dict).")


def _refused_pickle_reason(exc: BaseException, path: Optional[str] = None) -> Optional[str]:
    """Why torch.load(weights_only=True) failed on a pickle checkpoint, or None when ``exc`` is not such a failure.

    torch raises ``pickle.UnpicklingError`` both when weights_only refuses a global the pickle references and when
    the pickle bytes are damaged (timm re-raises either as a RuntimeError ``from`` it); the message text differs
    between torch versions, so the two are told apart by looking into the file instead: torch lists the globals of
    a zip checkpoint (torch.serialization.get_unsafe_globals_in_checkpoint).
    """
    if not any(isinstance(e, pickle.UnpicklingError) for e in _exception_chain(exc)):
        return None
    kind = _pickle_kind(path)
    names = _unsafe_globals(path) if kind == 'zip' else None
    if names:
        return ('it is a pickle checkpoint that references Python objects other than tensors '
                f"({', '.join(names)}), and timm-halo only loads weights with torch.load(weights_only=True), "
                'which refuses to create them (unpickling can run arbitrary code). ' + _CONVERT_HINT)
    if kind == 'legacy':  # torch cannot list the globals of this format: say what is likely, and the fix
        return ('torch.load(weights_only=True) refused this old-format (torch < 1.6) pickle checkpoint: it '
                'most likely references Python objects other than tensors, which timm-halo does not load '
                '(unpickling can run arbitrary code), or it is damaged. ' + _CONVERT_HINT)
    if kind == 'zip':
        return 'it could not be read as a checkpoint (truncated or corrupt?): its pickle data is damaged'
    return ('it could not be read as a checkpoint (truncated or corrupt?): it is neither a safetensors file nor '
            'a torch.save checkpoint')


def _not_found_reason(exc: BaseException) -> Optional[str]:
    """Why a weight file could not be found, or None when the exception is about something else."""
    if isinstance(exc, GatedRepoError):
        return 'the repo is gated: accept its terms on huggingface.co and log in (`hf auth login`)'
    if isinstance(exc, RepositoryNotFoundError):
        return 'the repo does not exist, or it is private and no token with access to it is set'
    if isinstance(exc, RevisionNotFoundError):
        return 'the repo has no such revision'
    if isinstance(exc, LocalEntryNotFoundError):  # before EntryNotFoundError: it is a subclass
        if hf_constants.is_offline_mode():
            return (f'it is not in the local Hugging Face cache ({hf_constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE '
                    'is set, so nothing was downloaded')
        return (f'it could not be downloaded (no connection?) and is not in the local Hugging Face cache '
                f'({hf_constants.HF_HUB_CACHE})')
    if isinstance(exc, EntryNotFoundError):
        return 'the repo has no such file'
    if isinstance(exc, FileNotFoundError):
        return 'no such file'
    return None


def _read_failure_reason(exc: BaseException, path: Optional[str] = None) -> str:
    refused = _refused_pickle_reason(exc, path)
    if refused is not None:
        return refused
    if isinstance(exc, SafetensorError):
        return f'it is not a valid safetensors file (truncated or corrupt?): {exc}'
    return f'it could not be read as a checkpoint (truncated or corrupt?): {type(exc).__name__}: {exc}'


def load_failure_message(arch: str, cfg: Dict[str, Any], exc: BaseException) -> str:
    """Explain why loading pretrained weights for ``arch`` from the source in ``cfg`` failed."""
    kind, loc = _weights_source(cfg)
    where = _describe_source(kind, loc)
    codes = _frames(exc)
    hint = ''
    not_found = _not_found_reason(exc)
    if kind == 'file' and not os.path.isfile(str(loc)):
        not_found = 'no such file' if not os.path.isdir(str(loc)) else (
            "it is a folder; use timm.create_model('local-dir:<folder>', pretrained=True) for a folder")
    if not_found is not None:
        reason = not_found
        hint = '\n' + _LOCAL_HINT.format(arch=arch)
    elif isinstance(exc, PretrainedWeightsError):
        reason = str(exc)
    elif any(code in _READ_CODES for code in codes):
        reason = _read_failure_reason(exc, _pickle_checkpoint_path(kind, loc))
    else:
        reason = f'{type(exc).__name__}: {exc}'
    return f'Could not load pretrained weights for {arch} from {where}: {reason}{hint}'


def no_weights_message(arch: str, cfg: Dict[str, Any]) -> str:
    """Explain that ``arch``'s cfg names no weights, and where the project will publish them."""
    tag = cfg.get('tag')
    name = f'{arch}.{tag}' if tag else arch
    planned = {model_tag: c for model_tag, c in get_arch_pretrained_cfgs(arch).items() if c.hf_hub_id}
    msg = (f"No pretrained weights are available for {arch}: its pretrained cfg '{name}' names no weight file, "
           'and timm.list_models(pretrained=True) lists the models that have some.')
    if planned:
        where = ', '.join(f"'{t}' at https://huggingface.co/{c.hf_hub_id} ({c.hf_hub_filename or 'model.safetensors'})"
                          for t, c in planned.items())
        msg += (f' The project has not published weights yet; they are planned as {where}: '
                f"timm.create_model('{next(iter(planned))}', pretrained=True) looks there.")
    return msg + '\n' + _LOCAL_HINT.format(arch=arch)


# --------------------------------------------------------------------------------------------------------------
# config.json of a Hub repo or save_for_hf folder
# --------------------------------------------------------------------------------------------------------------

# Keys of config.json's model_args that timm's builder takes besides the model's constructor arguments
_BUILD_ARGS = ('pretrained_strict', 'features_only', 'out_indices', 'feature_cls')


def halonet_models() -> List[str]:
    """The architectures this plugin registers with timm: ``halonet_h0`` ... ``halonet_h7``."""
    import timm
    from timm.models import model_entrypoint

    return [n for n in timm.list_models('halonet_*') if model_entrypoint(n).__module__.startswith('timm_halo.')]


def is_halonet(name: str) -> bool:
    """Whether ``name`` (``arch`` or ``arch.tag``, with a known tag) is one of this plugin's architectures."""
    from timm.models import split_model_name_tag

    if not isinstance(name, str):
        return False
    arch, tag = split_model_name_tag(name)
    return arch in halonet_models() and (not tag or name in get_arch_pretrained_cfgs(arch))


def model_arg_names() -> List[str]:
    """The keyword arguments a HaloNet build takes (constructor arguments and timm's builder options)."""
    from inspect import Parameter, signature

    from timm_halo.models import HaloNet

    params = signature(HaloNet.__init__).parameters.values()
    named = [p.name for p in params if p.name != 'self' and p.kind in (Parameter.POSITIONAL_OR_KEYWORD,
                                                                        Parameter.KEYWORD_ONLY)]
    return sorted(set(named) | set(_BUILD_ARGS))


def unknown_model_args(model_args: Dict[str, Any]) -> List[str]:
    """Keys of ``model_args`` that no HaloNet build takes, each with a close known name when there is one."""
    from difflib import get_close_matches

    known = model_arg_names()
    unknown = []
    for key in sorted(k for k in model_args if k not in known):
        close = get_close_matches(str(key), known, n=1)
        unknown.append(f'{key} (did you mean {close[0]}?)' if close else str(key))
    return unknown


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return 'object'
    if isinstance(value, (list, tuple)):
        return 'list'
    if isinstance(value, bool):
        return 'boolean'
    if isinstance(value, (int, float)):
        return 'number'
    return 'string' if isinstance(value, str) else 'null'


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_hub_config(config: Any, where: str) -> None:
    """Refuse a config.json that timm's parser would meet with a bare KeyError / AttributeError / TypeError,
    or that does not describe a HaloNet of this plugin. ``where`` names the file in messages.

    Raises:
        PretrainedWeightsError: naming the problem and the fix.
    """
    remake = 'or write the folder again with timm.models.save_for_hf / `timm-halo hub-export`'
    if not isinstance(config, dict):
        raise PretrainedWeightsError(
            f'{where} must hold a JSON object (architecture, num_classes, model_args, pretrained_cfg), got a '
            f'{_json_type(config)}; {remake}')
    arch = config.get('architecture')
    if arch is None:
        raise PretrainedWeightsError(
            f'{where} has no "architecture": timm needs the model name it was saved from, e.g. '
            f'"architecture": "halonet_h1"; add it, {remake}')
    if not isinstance(arch, str):
        raise PretrainedWeightsError(
            f'{where}: "architecture" must be a model name string such as "halonet_h1", got a {_json_type(arch)} '
            f'({json.dumps(arch)[:80]})')
    for key, example in (('model_args', '{"depths": [1, 1, 1, 1]}'), ('pretrained_cfg', '{"input_size": ...}')):
        if key in config and not isinstance(config[key], dict):
            raise PretrainedWeightsError(
                f'{where}: "{key}" must be a JSON object of keyword arguments (e.g. {example}), got a '
                f'{_json_type(config[key])} ({json.dumps(config[key])[:80]}); fix it, {remake}')
    if not is_halonet(arch):
        import timm

        what = 'a timm model but not a timm-halo HaloNet' if timm.is_model(arch) else 'not a registered timm model'
        raise PretrainedWeightsError(
            f'{where} names architecture {arch!r}, which is {what}: timm-halo inspects and exports only its '
            f'HaloNets ({", ".join(halonet_models())}). Load other models with timm.create_model('
            "'local-dir:<folder>' or 'hf-hub:<repo>', pretrained=True), their plugin imported")
    counts = [('num_classes', config.get('num_classes')),
              ('pretrained_cfg.num_classes', (config.get('pretrained_cfg') or {}).get('num_classes')),
              ('model_args.num_classes', (config.get('model_args') or {}).get('num_classes'))]
    for name, value in counts:
        if value is not None and not _is_count(value):
            raise PretrainedWeightsError(f'{where}: {name} must be an integer >= 0, got {json.dumps(value)[:80]}')
    unknown = unknown_model_args(config.get('model_args') or {})
    if unknown:
        raise PretrainedWeightsError(
            f'{where}: model_args has keys that {arch} does not take: {", ".join(unknown)}. Correct or remove '
            f'them; {arch} takes {", ".join(model_arg_names())}')


def num_classes_conflict(config: Any, where: str) -> Optional[str]:
    """A warning when config.json disagrees with itself on the number of classes, else None.

    timm (``_parse_model_cfg``) replaces ``pretrained_cfg.num_classes`` by the top-level ``num_classes`` and takes
    that as the classes of the weights; the model is built with ``model_args.num_classes`` when present. If the two
    differ, ``timm.create_model(..., pretrained=True)`` discards the weights' classifier and initialises a new
    random one, saying so only in a log line.
    """
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
    """Warn when timm is about to discard a checkpoint's classifier that fits the model as built.

    For a checkpoint filter (``pretrained_filter_fn``), which sees the weights and the built model just before
    timm's ``load_pretrained`` drops the classifier: timm does so whenever the model's num_classes differs from
    its pretrained cfg's, even when the weights' classifier has exactly the model's classes, e.g. a 5-class
    checkpoint loaded with ``num_classes=5`` but without ``num_classes=5`` in ``pretrained_cfg_overlay``, or a
    config.json whose class counts disagree.
    """
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


def _source_config(cfg: Dict[str, Any]) -> Optional[Tuple[Any, str]]:
    """(config.json as parsed JSON, its description) of a 'local-dir:' / 'hf-hub:' source, when at hand."""
    path: Any = None
    if cfg.get('source') == 'local-dir' and cfg.get('file'):
        path, where = Path(cfg['file']) / 'config.json', f"config.json of local folder '{cfg['file']}'"
    elif cfg.get('source') == 'hf-hub' and cfg.get('hf_hub_id'):
        repo, revision = timm_hub.hf_split(cfg['hf_hub_id'])
        where = f"config.json of Hugging Face Hub repo '{cfg['hf_hub_id']}'"
        try:  # timm has just downloaded it (a custom cache_dir is not looked at)
            path = huggingface_hub.try_to_load_from_cache(repo, 'config.json', revision=revision)
        except Exception:
            path = None
    if not isinstance(path, (str, Path)) or not os.path.isfile(path):
        return None
    try:
        return json.loads(Path(path).read_text(encoding='utf-8')), where
    except (OSError, ValueError):
        return None


def build_pretrained(
        build: Callable[[], nn.Module],
        variant: str,
        pretrained_cfg: Optional[Union[str, Dict[str, Any], PretrainedCfg]] = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
) -> nn.Module:
    """Run ``build()`` (timm's ``build_model_with_cfg`` with ``pretrained=True``) with clear errors.

    Errors raised while timm finds, reads or applies the weights become ``PretrainedWeightsError`` naming the
    source; errors from building the model itself (a bad kwarg, say) pass through unchanged.
    """
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg, pretrained_cfg_overlay).to_dict()
    arch = cfg.get('architecture') or variant
    if not _weights_source(cfg)[0]:
        raise PretrainedWeightsError(no_weights_message(arch, cfg))
    source_config = _source_config(cfg)
    if source_config is not None:
        conflict = num_classes_conflict(*source_config)
        if conflict:
            warnings.warn(conflict, UserWarning, stacklevel=5)  # user -> timm.create_model -> entrypoint -> here
    try:
        return build()
    except Exception as e:
        if not any(code in _LOAD_CODES for code in _frames(e)):
            raise
        raise PretrainedWeightsError(load_failure_message(arch, cfg, e)) from e


def read_checkpoint(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """A checkpoint's tensors through timm's reader (safetensors, or pickle with weights_only=True), unwrapped.

    Raises:
        PretrainedWeightsError: the file is missing, corrupt, or a pickle that needs more than tensors.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise PretrainedWeightsError(f"Checkpoint '{path}' does not exist (or is not a file)")
    try:
        return load_state_dict(path, weights_only=True)
    except Exception as e:
        raise PretrainedWeightsError(f"Could not read checkpoint '{path}': {_read_failure_reason(e, path)}") from e


# --------------------------------------------------------------------------------------------------------------
# Describing a model: model card and inspection
# --------------------------------------------------------------------------------------------------------------

def describe_model(model: nn.Module, gmacs: bool = True) -> Dict[str, Any]:
    """Architecture facts of a HaloNet (as built, kwargs included): sizes, params, input size, GMACs."""
    from timm_halo.models import HaloNet
    from timm_halo.summary import count_gmacs

    if not isinstance(model, HaloNet):
        raise TypeError(f'describe_model() describes timm_halo HaloNet models, got {type(model).__name__}')
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    attn = model.stages[0].blocks[0].attn
    stages = [dict(
        depth=len(stage.blocks),
        width=stage.blocks[0].attn.dim,
        out_chs=stage.blocks[-1].conv3.conv.out_channels,
    ) for stage in model.stages]
    input_size = tuple(cfg.get('input_size') or (model.in_chans, 256, 256))
    input_size = (model.in_chans, *input_size[1:])
    facts: Dict[str, Any] = dict(
        architecture=cfg.get('architecture') or type(model).__name__,
        params=sum(p.numel() for p in model.parameters()),
        num_classes=model.num_classes,
        num_features=model.num_features,
        in_chans=model.in_chans,
        input_size=input_size,
        block_size=attn.block_size,
        halo_size=attn.halo_size,
        heads=attn.heads,
        value_ratio=attn.dim_head_v / attn.dim_head,
        out_ratio=stages[0]['out_chs'] / stages[0]['width'],
        depths=[s['depth'] for s in stages],
        widths=[s['width'] for s in stages],
        stage_channels=[s['out_chs'] for s in stages],
        final_conv=model.num_features if not isinstance(model.final_conv, nn.Identity) else 0,
    )
    if gmacs:
        # Count on a meta-device copy: shapes only, no compute, no second set of weights in memory.
        meta = copy.deepcopy(model).to('meta').eval()
        facts['gmacs'] = count_gmacs(meta, input_size[-1], in_chans=input_size[0])
    return facts


def _paper_name(arch: str) -> str:
    """'halonet_h1' -> 'HaloNet-H1'."""
    if arch.startswith('halonet_h') and arch[len('halonet_h'):].isdigit():
        return f'HaloNet-H{arch[len("halonet_h"):]}'
    return arch


def model_card(
        model: nn.Module,
        repo_id: Optional[str] = None,
        dataset: Optional[Union[str, Sequence[str]]] = None,
        description: Optional[str] = None,
        license: str = 'apache-2.0',
        details: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """A model card for ``timm.models.push_to_hf_hub(model, repo_id, model_card=model_card(model, repo_id))``.

    It states what the model is (architecture and its settings, the paper, params, GMACs, input size, classes)
    and how to load it; timm renders it as the repo's README.md.

    Args:
        model: the HaloNet being published.
        repo_id: the Hub repo, for the usage snippet (``'me/halonet_h1-mydata'``).
        dataset: training data, e.g. ``'ImageNet-1k'`` (also becomes the card's ``datasets`` metadata).
        description: a first paragraph of your own; a factual default otherwise.
        license: the weights' license (Hub metadata).
        details: extra ``Model Details`` entries, e.g. ``{'Top-1': '79.1 (ImageNet-1k val)'}``.
    """
    facts = describe_model(model)
    arch = facts['architecture']
    c, h, w = facts['input_size']
    settings = (f"block size b={facts['block_size']}, halo h={facts['halo_size']}, value ratio "
                f"rv={facts['value_ratio']:g}, bottleneck ratio rb={facts['out_ratio']:g}, "
                f"depths {'-'.join(str(d) for d in facts['depths'])}, {facts['heads']} heads")
    if facts['final_conv']:
        settings += f", final 1x1 conv df={facts['final_conv']}"
    head = f"{facts['num_classes']}-way classifier" if facts['num_classes'] else 'no classifier (feature backbone)'
    if description is None:
        description = (
            f'A {_paper_name(arch)} image classification model ({arch}, {head}): a ResNet-style backbone whose '
            'bottleneck blocks use blocked local self-attention with a halo (HaloNet, Vaswani et al., CVPR 2021), '
            'implemented by the timm-halo plugin for timm. '
            + (f'Trained on {dataset if isinstance(dataset, str) else ", ".join(dataset)}.'
               if dataset else 'Training data: not stated by the publisher.'))
    card_details: Dict[str, Any] = {
        'Model Type': 'Image classification / feature backbone',
        'Architecture': f'{arch} ({settings})',
        'Model Stats': {
            'Params (M)': f"{facts['params'] / 1e6:.2f}",
            'GMACs': f"{facts['gmacs']:.2f}",
            'Image size': f'{h} x {w}' + (f' ({c} channels)' if c != 3 else ''),
            'Classes': facts['num_classes'],
        },
        'Papers': {PAPER_TITLE: PAPER_URL},
    }
    if dataset:
        card_details['Dataset'] = dataset
    card_details.update(details or {})
    name = f'hf-hub:{repo_id}' if repo_id else 'hf-hub:<user>/<repo>'
    usage = (
        '```python\n'
        '# pip install timm-halo\n'
        'import timm\n'
        'import timm_halo  # registers the HaloNet models with timm\n'
        'from PIL import Image\n\n'
        f"model = timm.create_model('{name}', pretrained=True).eval()\n"
        'config = timm.data.resolve_data_config({}, model=model)\n'
        'transform = timm.data.create_transform(**config)\n'
        "logits = model(transform(Image.open('image.jpg').convert('RGB')).unsqueeze(0))\n"
        '```\n'
        f"Fine-tune with a new head: `timm.create_model('{name}', pretrained=True, num_classes=10)`; "
        f"as a feature pyramid: `timm.create_model('{name}', pretrained=True, features_only=True)`."
    )
    return {
        'description': description,
        'details': card_details,
        'usage': usage,
        'citation': PAPER_BIBTEX,
        'tags': ['image-classification', 'timm', 'timm-halo', 'halonet'],
        'license': license,
    }


# --------------------------------------------------------------------------------------------------------------
# Export and inspection
# --------------------------------------------------------------------------------------------------------------

def _checkpoint_head_and_chans(state_dict: Dict[str, torch.Tensor]) -> Tuple[int, Optional[int]]:
    """Classes of a checkpoint's classifier (0 when it has none) and its stem's input channels."""
    head = state_dict.get('head.fc.weight')
    stem = state_dict.get('stem.0.conv.weight', state_dict.get('stem.conv1.conv.weight'))  # ours / timm ByobNet
    return (head.shape[0] if head is not None else 0), (stem.shape[1] if stem is not None else None)


def export_for_hub(
        checkpoint: Union[str, Path],
        output: Union[str, Path],
        model_name: str,
        num_classes: Optional[int] = None,
        model_args: Optional[Dict[str, Any]] = None,
        label_names: Optional[Sequence[str]] = None,
        dataset: Optional[str] = None,
        repo_id: Optional[str] = None,
        overwrite: bool = False,
        img_size: Optional[int] = None,
) -> Dict[str, Any]:
    """Write a Hub-ready folder for a checkpoint: timm's save_for_hf layout plus a README model card.

    The checkpoint (.safetensors, or a .pth/.pth.tar/.bin read with weights_only=True, timm training checkpoints
    and timm's ByobNet ``halonet_h1`` layout included) is loaded through ``timm.create_model(model_name,
    pretrained=True, pretrained_cfg_overlay=dict(file=...))``; its classes and input channels are read from
    the weights. The folder is then reloaded through ``local-dir:`` and checked to give the same logits.

    Args:
        checkpoint: the weights.
        output: folder to write (must be empty unless ``overwrite``).
        model_name: registered architecture, e.g. ``'halonet_h1'``.
        num_classes: the checkpoint's classes (checked), or 0 to publish the backbone without its classifier.
        model_args: constructor kwargs the checkpoint was trained with, e.g. ``{'depths': [1, 1, 1, 1]}``.
        label_names: class names, one per class (stored in config.json as timm's ``label_names``).
        dataset: training data, for the model card.
        repo_id: the Hub repo it is meant for, for the model card's usage snippet.
        overwrite: allow writing into a non-empty folder.
        img_size: the input size the checkpoint was trained at (square), written to config.json's ``input_size``
            (and ``test_input_size`` / ``pool_size`` where the cfg has them); default: the model's default cfg.

    Returns:
        A summary: folder, files, architecture, params, num_classes, in_chans, input_size, max |logit diff| on
        reload.
    """
    import timm
    from timm.models import save_for_hf

    output = Path(output)
    problem = output_problem(output, overwrite, 'overwrite=True')
    if problem:
        raise ValueError(problem)
    if not is_halonet(model_name):
        raise ValueError(model_name_problem(model_name))
    unknown = unknown_model_args(model_args or {})
    if unknown:
        raise ValueError(
            f'{model_name} takes no model_args {", ".join(unknown)}; it takes {", ".join(model_arg_names())}')
    default_cfg = timm.models.get_pretrained_cfg(model_name)
    size_problem = img_size_problem(img_size, default_cfg)
    if size_problem:
        raise ValueError(size_problem)
    ckpt_classes, in_chans = _checkpoint_head_and_chans(read_checkpoint(checkpoint))
    if num_classes is None:
        num_classes = ckpt_classes
    elif num_classes not in (0, ckpt_classes):
        raise ValueError(
            f"The checkpoint's classifier has {ckpt_classes} classes but num_classes={num_classes}: exporting it "
            'would publish a randomly initialised classifier. Use the checkpoint\'s count, or 0 to drop the head.')
    if label_names is not None:
        label_names = list(label_names)
        if len(label_names) != num_classes:
            raise ValueError(f'{len(label_names)} label names for {num_classes} classes')

    model_args = dict(model_args or {})
    overlay: Dict[str, Any] = dict(file=str(checkpoint), num_classes=ckpt_classes)
    if in_chans is not None:
        model_args.setdefault('in_chans', in_chans)
    overlay.update(_input_size_overlay(default_cfg, in_chans or default_cfg.input_size[0], img_size))
    model = timm.create_model(
        model_name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes, **model_args).eval()

    output.mkdir(parents=True, exist_ok=True)
    model_config: Dict[str, Any] = {'pretrained_cfg': {'tag': None}}  # the exported weights are not 'untrained'
    if label_names:
        model_config['label_names'] = label_names
    save_for_hf(model, str(output), model_config=model_config, safe_serialization=True)
    card = model_card(model, repo_id=repo_id, dataset=dataset)
    readme = timm_hub.generate_readme(card, (repo_id or model_name).split('/')[-1])
    (output / 'README.md').write_text(readme, encoding='utf-8')

    # The folder must reload through timm's own local-dir: path and compute the same function.
    reloaded = timm.create_model(f'local-dir:{output}', pretrained=True).eval()
    x = torch.randn(1, model.in_chans, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(x) - reloaded(x)).abs().max().item()
    if diff != 0:
        raise RuntimeError(f"The exported folder '{output}' reloads with different outputs (max |diff| {diff:g})")
    return dict(
        output=str(output),
        files=sorted(p.name for p in output.iterdir()),
        architecture=model.pretrained_cfg['architecture'],
        params=sum(p.numel() for p in model.parameters()),
        num_classes=model.num_classes,
        in_chans=model.in_chans,
        input_size=tuple(model.pretrained_cfg['input_size']),
        reload_max_abs_diff=diff,
    )


def output_problem(output: Union[str, Path], overwrite: bool, overwrite_flag: str) -> Optional[str]:
    """Why ``output`` cannot be exported to (``overwrite_flag`` names the option that allows a non-empty one)."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        return f"Output '{output}' exists and is not a folder; choose a folder"
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        return (f"Output folder '{output}' is not empty; choose a new folder, or pass {overwrite_flag} to write "
                'into it (files of the same names are replaced)')
    return None


def model_name_problem(name: str) -> str:
    return f'unknown model {name!r}: hub-export writes timm-halo HaloNets; choose from {", ".join(halonet_models())}'


def img_size_problem(img_size: Optional[int], default_cfg: PretrainedCfg) -> Optional[str]:
    lowest = (default_cfg.min_input_size or (3, 32, 32))[-1]
    if img_size is not None and (not _is_count(img_size) or img_size < lowest):
        return f'img_size must be an integer >= {lowest} (the model\'s min_input_size), got {img_size!r}'
    return None


def _input_size_overlay(default_cfg: PretrainedCfg, in_chans: int, img_size: Optional[int]) -> Dict[str, Any]:
    """pretrained_cfg entries for the exported input: channels, and the trained size when given."""
    size = tuple(default_cfg.input_size[1:]) if img_size is None else (img_size, img_size)
    overlay: Dict[str, Any] = dict(input_size=(in_chans, *size))
    if img_size is not None:
        if default_cfg.test_input_size:
            overlay['test_input_size'] = (in_chans, img_size, img_size)
        # the final feature map at that size (HaloNet's stride-2 stages round up: a reduction of 32)
        for key in ('pool_size', 'test_pool_size'):
            if getattr(default_cfg, key):
                overlay[key] = (-(-img_size // 32), -(-img_size // 32))
    return overlay


def _split_source(source: str) -> Tuple[str, str]:
    """'hf-hub:org/name' | 'local-dir:path' | existing folder | 'org/name' -> (kind, id)."""
    for prefix in ('hf-hub:', 'local-dir:'):
        if source.startswith(prefix):
            return prefix[:-1], source[len(prefix):]
    if os.path.isdir(source):
        return 'local-dir', source
    if source.count('/') == 1 and not source.startswith(('.', '/')):
        return 'hf-hub', source
    raise ValueError(f"'{source}' is neither an existing folder nor a Hub repo id like 'org/name'")


def inspect_hub_model(source: str, load: bool = True) -> Dict[str, Any]:
    """What a Hub-ready folder or Hub repo holds: architecture, config, files, and (``load``) the built model.

    config.json is checked first (``check_hub_config``: a HaloNet of this plugin, well-formed, known model_args),
    then parsed by timm; with ``load`` the model is built with ``timm.create_model(<source>, pretrained=True)``
    (a strict load, downloading the weights for a Hub repo unless HF_HUB_OFFLINE is set). ``warnings`` in the
    result lists what looked wrong without stopping the inspection (a num_classes disagreement, say).

    Raises:
        PretrainedWeightsError: the folder/repo or its config.json cannot be found, read or used, or the model
            cannot be built from it.
    """
    import timm

    kind, ident = _split_source(source)
    if kind == 'local-dir':
        folder = Path(ident)
        config_path = folder / 'config.json'
        where = f"config.json of local folder '{folder}'"
        if not config_path.is_file():
            raise PretrainedWeightsError(f"'{folder}' has no config.json: it is not a save_for_hf / hub-export folder")
    else:
        repo, revision = timm_hub.hf_split(ident)
        where = f"config.json of Hugging Face Hub repo '{ident}'"
        try:
            config_path = Path(huggingface_hub.hf_hub_download(repo, 'config.json', revision=revision))
        except Exception as e:
            reason = _not_found_reason(e) or f'{type(e).__name__}: {e}'
            raise PretrainedWeightsError(
                f"Could not get config.json of Hugging Face Hub repo '{ident}': {reason}") from e
        folder = config_path.parent
    try:
        raw = json.loads(config_path.read_text(encoding='utf-8'))
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or UTF-8
        raise PretrainedWeightsError(f'Could not parse {where}: {e}') from e
    check_hub_config(raw, where)
    try:
        if kind == 'local-dir':
            cfg, arch, model_args = timm_hub.load_model_config_from_path(folder)
        else:
            cfg, arch, model_args = timm_hub.load_model_config_from_hf(ident)
    except Exception as e:
        raise PretrainedWeightsError(f'Could not parse {where} with timm: {type(e).__name__}: {e}') from e
    conflict = num_classes_conflict(raw, where)
    info: Dict[str, Any] = dict(
        source=f'{kind}:{ident}',
        architecture=arch,
        num_classes=cfg.get('num_classes'),
        label_names=len(cfg.get('label_names') or ()),
        model_args=model_args,
        pretrained_cfg={k: v for k, v in cfg.items() if k not in ('file', 'source', 'hf_hub_id')},
        warnings=[conflict] if conflict else [],
    )
    if load:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                model = timm.create_model(f'{kind}:{ident}', pretrained=True).eval()
        except (TypeError, ValueError) as e:  # the constructor refused model_args (weight errors are ours)
            raise PretrainedWeightsError(
                f'Could not build {arch} from {where}: its model_args {json.dumps(model_args)} are refused: {e}') from e
        for w in caught:
            if str(w.message) not in info['warnings']:
                info['warnings'].append(str(w.message))
        # timm discards the weights' classifier when the model's classes differ from the cfg's (see the warning)
        info['classifier_reinitialised'] = bool(model.num_classes != cfg.get('num_classes'))
        info['num_classes_built'] = model.num_classes
        info['params'] = sum(p.numel() for p in model.parameters())
        info['weights_finite'] = all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
                                     if t.is_floating_point())
        facts = describe_model(model)
        info['gmacs'] = facts['gmacs']
        info['settings'] = {k: facts[k] for k in ('block_size', 'halo_size', 'heads', 'value_ratio',
                                                  'out_ratio', 'depths', 'widths', 'final_conv')}
    # files present locally (for a Hub repo: those in the cache snapshot, i.e. what has been downloaded)
    info['files'] = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    return info


# --------------------------------------------------------------------------------------------------------------
# Command line: `timm-halo hub-export` and `timm-halo hub-inspect`
# --------------------------------------------------------------------------------------------------------------

def json_object_arg(text: str) -> Dict[str, Any]:
    """argparse type for options such as --model-args: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f'not valid JSON: {e}') from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object, e.g. \'{"depths": [1, 1, 1, 1]}\'')
    return value


def _one_line(message: str) -> str:
    """A multi-line message as one line (sentences kept apart)."""
    parts = [part.strip() for part in str(message).splitlines() if part.strip()]
    out = ''
    for part in parts:
        out += part if not out else (' ' if out[-1] in '.:;!?' else '; ') + part
    return out


def _fail(command: str, message: Any) -> int:
    print(f'timm-halo {command}: error: {_one_line(str(message))}', file=sys.stderr)
    return 1


def _cmd_hub_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import timm

    parser = getattr(args, 'subcommand_parser', parser)  # usage and errors of `timm-halo hub-export`
    if not is_halonet(args.model):
        parser.error(model_name_problem(args.model))
    problem = img_size_problem(args.img_size, timm.models.get_pretrained_cfg(args.model))
    if problem:
        parser.error(problem.replace('img_size', '--img-size', 1))
    if args.num_classes is not None and args.num_classes < 0:
        parser.error(f'--num-classes must be >= 0 (0 drops the classifier), got {args.num_classes}')
    unknown = unknown_model_args(args.model_args or {})
    if unknown:
        parser.error(f'--model-args: {args.model} takes no {", ".join(unknown)}; it takes '
                     f'{", ".join(model_arg_names())}')
    problem = output_problem(args.output, args.overwrite, '--overwrite')
    if problem:
        return _fail('hub-export', problem)
    try:
        labels = None
        if args.labels:
            labels = [line.strip() for line in Path(args.labels).read_text().splitlines() if line.strip()]
        summary = export_for_hub(
            args.checkpoint, args.output, args.model, num_classes=args.num_classes, model_args=args.model_args,
            label_names=labels, dataset=args.dataset, repo_id=args.repo_id, overwrite=args.overwrite,
            img_size=args.img_size)
    except (PretrainedWeightsError, ValueError, TypeError, OSError) as e:
        return _fail('hub-export', e)
    except Exception as e:  # anything else still gets one line, not a traceback
        return _fail('hub-export', f'{type(e).__name__}: {e}')
    out = sys.stdout
    print(f"wrote {summary['output']}: {', '.join(summary['files'])}", file=out)
    print(f"  {summary['architecture']}: {summary['params'] / 1e6:.2f}M params, {summary['num_classes']} classes, "
          f"{summary['in_chans']} input channels, input size {summary['input_size']}", file=out)
    print(f"  reloaded through timm.create_model('local-dir:{summary['output']}', pretrained=True): "
          f"max |logit diff| {summary['reload_max_abs_diff']:g}", file=out)
    repo = args.repo_id or '<user>/<repo>'
    print(f"next: hf upload {repo} {summary['output']}   (then timm.create_model('hf-hub:{repo}', pretrained=True))",
          file=out)
    return 0


def _cmd_hub_inspect(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        info = inspect_hub_model(args.source, load=not args.no_load)
    except (PretrainedWeightsError, ValueError) as e:
        return _fail('hub-inspect', e)
    except Exception as e:  # anything else still gets one line, not a traceback
        return _fail('hub-inspect', f'{type(e).__name__}: {e}')
    for message in info['warnings']:
        print(f'timm-halo hub-inspect: warning: {_one_line(message)}', file=sys.stderr)
    out = sys.stdout
    cfg = info['pretrained_cfg']
    print(f"source        {info['source']}", file=out)
    print(f"architecture  {info['architecture']}", file=out)
    if 'params' in info:
        loaded = ('loaded, but timm re-initialised its classifier at random (see the warning)'
                  if info['classifier_reinitialised'] else 'loaded strictly')
        print(f"params        {info['params'] / 1e6:.2f}M ({info['params']:,}), {loaded}; "
              f"all weights finite: {'yes' if info['weights_finite'] else 'NO'}", file=out)
    if 'gmacs' in info:
        print(f"GMACs         {info['gmacs']:.2f} at {cfg.get('input_size')}", file=out)
        print(f"settings      {json.dumps(info['settings'])}", file=out)
    built = info.get('num_classes_built', info['num_classes'])
    print(f"num_classes   {info['num_classes']}" + (f" ({info['label_names']} label names)"
                                                    if info['label_names'] else '')
          + (f'; the model was built with {built}' if built != info['num_classes'] else ''), file=out)
    print(f"input         {cfg.get('input_size')}, {cfg.get('interpolation')}, crop_pct {cfg.get('crop_pct')}, "
          f"mean {cfg.get('mean')}, std {cfg.get('std')}", file=out)
    print(f"model_args    {json.dumps(info['model_args'])}", file=out)
    print('files         ' + ', '.join(f'{n} ({s / 1e6:.2f} MB)' for n, s in info['files'].items()), file=out)
    shown = {k: v for k, v in cfg.items() if k != 'label_names'}
    print('pretrained_cfg ' + json.dumps(shown, indent=2, default=str), file=out)
    return 0


def add_cli_commands(subparsers: Any) -> None:
    """Add ``hub-export`` and ``hub-inspect`` to the ``timm-halo`` command; each sets ``handler``."""
    export = subparsers.add_parser(
        'hub-export', help='write a Hub-ready folder (weights, config.json, README model card) for a checkpoint',
        description='Load a checkpoint into a registered HaloNet through timm, then write timm\'s save_for_hf '
                    'folder plus a README model card, and check that it reloads with the same logits.')
    export.add_argument('--model', required=True, help='architecture, e.g. halonet_h1')
    export.add_argument('--checkpoint', required=True, help='.safetensors, or .pth/.pth.tar/.bin (weights only)')
    export.add_argument('--output', required=True, help='folder to write')
    export.add_argument('--num-classes', type=int, default=None,
                        help="the checkpoint's classes (default: read from its classifier); 0 drops the classifier")
    export.add_argument('--model-args', type=json_object_arg, default=None,
                        help='constructor kwargs as JSON, e.g. \'{"depths": [1, 1, 1, 1]}\'')
    export.add_argument('--labels', default=None, help='text file with one class name per line')
    export.add_argument('--dataset', default=None, help='training data, for the model card (e.g. ImageNet-1k)')
    export.add_argument('--repo-id', default=None, help='Hub repo it is meant for, for the model card')
    export.add_argument('--overwrite', action='store_true', help='allow a non-empty output folder')
    export.add_argument('--img-size', type=int, default=None,
                        help="the (square) input size the checkpoint was trained at, written to config.json's "
                             "input_size (default: the model's default cfg, e.g. 256 for halonet_h1)")
    export.set_defaults(handler=_cmd_hub_export, subcommand_parser=export)

    inspect = subparsers.add_parser(
        'hub-inspect', help='show architecture, params and config of a Hub-ready folder or Hub repo',
        description='Read config.json with timm, build the model with its weights, and print what it is.')
    inspect.add_argument('source', help="folder, 'org/name' Hub repo, or a 'local-dir:' / 'hf-hub:' name")
    inspect.add_argument('--no-load', action='store_true', help='only read config.json; do not build the model')
    inspect.set_defaults(handler=_cmd_hub_inspect)
