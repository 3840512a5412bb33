"""Model cards, transformers-ready save_for_hf / push_to_hf_hub, `hub-export`, `hub-inspect` (docs/hub.md)."""
import argparse
import copy
import inspect
import json
import os
import stat
import warnings
from difflib import get_close_matches
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union
from zipfile import is_zipfile

import timm
import torch
import torch.nn as nn
from huggingface_hub import HfApi
from huggingface_hub.utils._validators import REPO_ID_REGEX
from timm.models._helpers import _torch_load
from timm.models._hub import download_from_hf, generate_readme, load_cfg_from_json, load_model_config_from_path

from timm_halo.bench import count_gmacs
from timm_halo.models import HaloNet, _pretrained
from timm_halo.models._pretrained import PretrainedWeightsError, _is_count, num_classes_conflict
from timm_halo.models.halonet import FAMILY, PAPER_TITLE

__all__ = ['PretrainedWeightsError', 'model_card', 'save_for_hf', 'push_to_hf_hub', 'fix_hub_config', 'export_for_hub',
           'inspect_hub_model', 'read_checkpoint', 'describe_model']

PAPER_URL = 'https://arxiv.org/abs/2103.12731'
PAPER_BIBTEX = """@inproceedings{vaswani2021halonet,
  title={Scaling Local Self-Attention for Parameter Efficient Visual Backbones},
  author={Vaswani, Ashish and Ramachandran, Prajit and Srinivas, Aravind and Parmar, Niki and
          Hechtman, Blake and Shlens, Jonathon},
  booktitle={IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2021}
}"""
# Keys of config.json's model_args that timm's builder takes besides the model's constructor arguments
_BUILD_ARGS = ('pretrained_strict', 'features_only', 'out_indices', 'feature_cls')
# Dataset ids without an owner that timm's own model cards use (the Hub resolves them); any other `datasets:`
# entry of a card must be a Hub dataset repo id, 'owner/name'
_CANONICAL_DATASETS = ('imagenet-1k', 'imagenet-12k', 'imagenet-21k', 'imagenet-22k')
Size = Union[int, Tuple[int, int]]  # a square side, or (height, width)
# The keyword arguments a HaloNet build takes: its constructor's and timm's builder options
MODEL_ARG_NAMES = sorted({p.name for p in inspect.signature(HaloNet.__init__).parameters.values()
                          if p.name != 'self' and p.kind != p.VAR_KEYWORD} | set(_BUILD_ARGS))


def read_checkpoint(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """A checkpoint's tensors through timm's ``load_state_dict``; PretrainedWeightsError where it cannot be read."""
    if problem := _pretrained.checkpoint_problem(str(path)):
        raise PretrainedWeightsError(f"Could not read checkpoint '{path}': {problem}")
    return timm.models.load_state_dict(str(path), weights_only=True)


def is_hub_dataset_id(name: Any) -> bool:
    """Whether ``name`` is a Hub dataset id (``owner/name``, or an owner-less ImageNet id as timm's cards use)."""
    return isinstance(name, str) and (name.lower() in _CANONICAL_DATASETS or name.count('/') == 1 and bool(
        REPO_ID_REGEX.fullmatch(name)) and '--' not in name and '..' not in name)  # as validate_repo_id


def is_halonet(name: Any) -> bool:
    """Whether ``name`` (``arch`` or ``arch.tag``, with a known tag) is one of this plugin's architectures."""
    arch, tag = timm.models.split_model_name_tag(name) if isinstance(name, str) else (None, '')
    return arch in FAMILY and (not tag or name in timm.models.get_arch_pretrained_cfgs(arch))


def unknown_model_args(model_args: Dict[str, Any]) -> List[str]:
    """Keys of ``model_args`` that no HaloNet build takes, each with a close known name when there is one."""
    close = {key: get_close_matches(str(key), MODEL_ARG_NAMES, n=1) for key in model_args if key not in MODEL_ARG_NAMES}
    return [f'{key} (did you mean {match[0]}?)' if match else str(key) for key, match in sorted(close.items())]


def _hw(size: Optional[Size]) -> Optional[Tuple[int, ...]]:
    return None if size is None else tuple(size) if isinstance(size, (list, tuple)) else (size, size)


def export_args_problem(model_name: str, model_args: Optional[Dict[str, Any]], img_size: Optional[Size]
                        ) -> Optional[str]:
    """Why ``export_for_hub`` (`hub-export`) cannot take these arguments, else None."""
    if not is_halonet(model_name):
        return f'unknown model {model_name!r}; choose from {", ".join(FAMILY)}'
    lowest = (timm.models.get_pretrained_cfg(model_name).min_input_size or (3, 32, 32))[-1]
    hw = _hw(img_size)
    if hw is not None and not (len(hw) == 2 and all(_is_count(side) and side >= lowest for side in hw)):
        return (f"--img-size / img_size must be an integer >= {lowest} (the model's min_input_size), or (height, "
                f'width) of such, got {img_size!r}')
    unknown = unknown_model_args(model_args or {})
    return (f"{model_name} takes no --model-args / model_args {', '.join(unknown)}; it takes "
            f"{', '.join(MODEL_ARG_NAMES)}") if unknown else None


def check_hub_config(config: Any, where: str) -> None:
    """PretrainedWeightsError for a config.json that timm would misread, or that describes no HaloNet of ours."""
    def refuse(problem: str, remake: bool = True) -> None:
        remake_hint = '; fix it, or write the folder again with timm.models.save_for_hf / `timm-halo hub-export`'
        raise PretrainedWeightsError(f'{where}: {problem}' + (remake_hint if remake else ''))

    if not isinstance(config, dict):
        refuse('it must hold a JSON object (architecture, num_classes, model_args, pretrained_cfg), got '
               + json.dumps(config)[:80])
    arch = config.get('architecture')
    if not isinstance(arch, str):
        refuse('it has no "architecture" model name string (timm needs the name it was saved from, e.g. '
               f'"architecture": "halonet_h1"), got {json.dumps(arch)[:80]}')
    for key in ('model_args', 'pretrained_cfg'):
        if key in config and not isinstance(config[key], dict):
            refuse(f'"{key}" must be a JSON object of keyword arguments, got {json.dumps(config[key])[:80]}')
    if not is_halonet(arch):
        what = 'a timm model but not a timm-halo HaloNet' if timm.is_model(arch) else 'not a registered timm model'
        refuse(f'it names architecture {arch!r}, which is {what}: timm-halo inspects and exports only its HaloNets '
               f"({', '.join(FAMILY)}). Load other models with timm.create_model('local-dir:<folder>' or "
               "'hf-hub:<repo>', pretrained=True), their plugin imported", remake=False)
    for name, value in (('num_classes', config.get('num_classes')),
                        ('pretrained_cfg.num_classes', config.get('pretrained_cfg', {}).get('num_classes')),
                        ('model_args.num_classes', config.get('model_args', {}).get('num_classes'))):
        if value is not None and not _is_count(value):
            refuse(f'{name} must be an integer >= 0, got {json.dumps(value)[:80]}')
    if unknown := unknown_model_args(config.get('model_args', {})):
        refuse(f'model_args has keys that {arch} does not take: {", ".join(unknown)}. Correct or remove them; '
               f'{arch} takes {", ".join(MODEL_ARG_NAMES)}', remake=False)


def describe_model(model: nn.Module) -> Dict[str, Any]:
    """Architecture facts of a HaloNet (as built, kwargs included): sizes, params, input size, GMACs."""
    if not isinstance(model, HaloNet):
        raise TypeError(f'describe_model() describes timm_halo HaloNet models, got {type(model).__name__}')
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    attn, last = model.stages[0].blocks[0].attn, model.stages[0].blocks[-1]
    input_size = (model.in_chans, *tuple(cfg.get('input_size') or (3, 256, 256))[1:])
    return dict(
        architecture=cfg.get('architecture') or type(model).__name__, num_classes=model.num_classes, heads=attn.heads,
        params=sum(p.numel() for p in model.parameters()), in_chans=model.in_chans, input_size=input_size,
        block_size=attn.block_size, halo_size=attn.halo_size, value_ratio=attn.dim_head_v / attn.dim_head,
        out_ratio=last.conv3.conv.out_channels / attn.dim, depths=[len(s.blocks) for s in model.stages],
        widths=[s.blocks[0].attn.dim for s in model.stages],
        final_conv=model.num_features if not isinstance(model.final_conv, nn.Identity) else 0,
        # counted on a meta-device copy: shapes only, no compute, no second set of weights in memory
        gmacs=count_gmacs(copy.deepcopy(model).to('meta').eval(), input_size[-1], input_size[0]))


def model_card(model: nn.Module, repo_id: Optional[str] = None, dataset: Optional[Union[str, Sequence[str]]] = None,
               description: Optional[str] = None, license: str = 'apache-2.0',
               details: Optional[Dict[str, Any]] = None, local_dir: Optional[str] = None) -> Dict[str, Any]:
    """A model card for ``timm.models.push_to_hf_hub(..., model_card=model_card(model, repo_id))`` (docs/hub.md)."""
    facts = describe_model(model)
    arch, (c, h, w) = facts['architecture'], facts['input_size']
    settings = ('block size b={block_size}, halo h={halo_size}, value ratio rv={value_ratio:g}, bottleneck ratio '
                'rb={out_ratio:g}, depths {d}, {heads} heads'.format(d='-'.join(map(str, facts['depths'])), **facts)
                + (f", final 1x1 conv df={facts['final_conv']}" if facts['final_conv'] else ''))
    datasets = [dataset] if isinstance(dataset, str) else list(dataset or ())
    if description is None:
        head = f"{facts['num_classes']}-way classifier" if facts['num_classes'] else 'no classifier (feature backbone)'
        description = (
            f"A {f'HaloNet-H{arch[-1]}' if arch in FAMILY else arch} image classification model ({arch}, {head}): "
            'a ResNet-style backbone whose bottleneck blocks use blocked local self-attention with a halo (HaloNet, '
            'Vaswani et al., CVPR 2021), implemented by the timm-halo plugin for timm. '
            + (f'Trained on {", ".join(datasets)}.' if datasets else 'Training data: not stated by the publisher.'))
    stats = {'Params (M)': f"{facts['params'] / 1e6:.2f}", 'GMACs': f"{facts['gmacs']:.2f}",
             'Image size': f'{h} x {w}' + (f' ({c} channels)' if c != 3 else ''), 'Classes': facts['num_classes']}
    # timm's card writes details['Dataset'] into the `datasets:` metadata, which the Hub reads as dataset repo ids
    hub_ids = [d for d in datasets if is_hub_dataset_id(d)]
    free_text = [d for d in datasets if d not in hub_ids]
    card_details: Dict[str, Any] = {
        'Model Type': 'Image classification / feature backbone', 'Architecture': f'{arch} ({settings})',
        'Model Stats': stats, 'Papers': {PAPER_TITLE: PAPER_URL},
        **({'Dataset': hub_ids[0] if len(hub_ids) == 1 else hub_ids} if hub_ids else {}),
        **({'Training data': ', '.join(free_text)} if free_text else {}), **(details or {})}
    where = repo_id or local_dir or '.'  # the usage loads the repo, else the folder holding the card
    name = f'hf-hub:{repo_id}' if repo_id else f'local-dir:{where}'
    folder_note = '' if repo_id else '  # the folder holding this card and its weights'
    registers = 'import timm_halo  # registers the HaloNet models with timm\nfrom PIL import Image\n'
    usage = (f"```python\n# pip install timm-halo\nimport timm\n{registers}\nmodel = timm.create_model('{name}', "
             f"pretrained=True).eval(){folder_note}\nconfig = timm.data.resolve_data_config({{}}, model=model)\n"
             "transform = timm.data.create_transform(**config)\nlogits = model(transform(Image.open('image.jpg')"
             f".convert('RGB')).unsqueeze(0))\n```\nFine-tune with a new head: `timm.create_model('{name}', "
             f"pretrained=True, num_classes=10)`; as a feature pyramid: `timm.create_model('{name}', pretrained=True, "
             'features_only=True)`.\n\nWith transformers (its timm wrapper; the same logits and class names):\n'
             f'```python\n# pip install timm-halo transformers\n{registers}from transformers import AutoModel, '
             f"pipeline\n\nclassify = pipeline('image-classification', model='{where}')\nprint(classify(Image.open("
             f"'image.jpg')))\nbackbone = AutoModel.from_pretrained('{where}')  # pooled features: .pooler_output\n```")
    return dict(description=description, details=card_details, usage=usage, citation=PAPER_BIBTEX,
                tags=['image-classification', 'timm', 'timm-halo', 'halonet', 'transformers'], license=license)


_default_card = model_card  # push_to_hf_hub's argument of that name hides it


def fix_hub_config(folder: Union[str, Path]) -> bool:
    """Drop ``model_args.num_classes`` from a save_for_hf folder's config.json; whether it changed (docs/hub.md)."""
    path = Path(folder) / 'config.json'
    try:
        config = load_cfg_from_json(path)
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or UTF-8
        raise PretrainedWeightsError(f"Could not read '{path}': {e}") from e
    model_args = config.get('model_args') if isinstance(config, dict) else None
    if not isinstance(model_args, dict) or 'num_classes' not in model_args:
        return False
    if conflict := num_classes_conflict(config, f"'{path}'"):
        raise PretrainedWeightsError(conflict)
    config.setdefault('num_classes', model_args.pop('num_classes'))  # timm's count of the weights stays in the file
    path.write_text(json.dumps(config, indent=2), encoding='utf-8')  # as timm writes it
    return True


def save_for_hf(model: nn.Module, save_directory: Union[str, Path], model_config: Optional[Dict[str, Any]] = None,
                *args: Any, **kwargs: Any) -> None:
    """timm's ``save_for_hf`` (same arguments and files), whose folder also loads in transformers (docs/hub.md)."""
    names, classes = (model_config or {}).get('label_names'), getattr(model, 'num_classes', None)
    if names is not None and not (isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)):
        raise ValueError(f'label_names must be a list of class names, one per class in classifier order (transformers '
                         f'reads them by position), got {type(names).__name__} {str(names)[:80]}')
    if names is not None and classes is not None and len(names) != classes:
        raise ValueError(f'{len(names)} label_names for a model with {classes} classes; give one name per class')
    timm.models.save_for_hf(model, str(save_directory), model_config, *args, **kwargs)
    fix_hub_config(save_directory)
    weights, config = Path(save_directory) / 'model.safetensors', Path(save_directory) / 'config.json'
    if weights.is_file():  # safetensors writes 0600: give it the mode open() gave config.json
        weights.chmod(stat.S_IMODE(config.stat().st_mode))


def push_to_hf_hub(model: nn.Module, repo_id: str, commit_message: str = 'Add model', token: Optional[str] = None,
                   revision: Optional[str] = None, private: bool = False, create_pr: bool = False,
                   model_config: Optional[Dict[str, Any]] = None, model_card: Optional[Dict[str, Any]] = None,
                   model_args: Optional[Dict[str, Any]] = None, task_name: str = 'image-classification',
                   safe_serialization: Union[bool, str] = 'both', data_config: Optional[Dict[str, Any]] = None
                   ) -> Any:
    """timm's ``push_to_hf_hub`` (same arguments) through ``save_for_hf`` above, a HaloNet's card by default."""
    api = HfApi(token=token, library_name='timm', library_version=timm.__version__)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # the owner filled in
    has_readme = api.file_exists(repo_id=repo_id, filename='README.md', revision=revision)
    with TemporaryDirectory() as folder:
        save_for_hf(model, folder, model_config=model_config, model_args=model_args,
                    safe_serialization=safe_serialization, data_config=data_config)
        if not has_readme:
            card = _default_card(model, repo_id) if model_card is None and isinstance(model, HaloNet) else model_card
            readme = generate_readme(card or {}, repo_id.split('/')[-1], task_name=task_name)
            (Path(folder) / 'README.md').write_text(readme, encoding='utf-8')
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message)


def _apply_train_args(args: Dict[str, Any], model_name: Optional[str], model_args: Dict[str, Any],
                      img_size: Optional[Tuple[int, int]]) -> Tuple[str, Dict[str, Any], Any, List, List]:
    """The settings with what was not given taken from train.py's ``args``, what was taken, and notes (docs/hub.md)."""
    took, notes = [], []  # what was taken from the args, and where they disagree with what was given

    def merge(label: str, given: Any, trained: Any, field: str, show: Callable[[Any], str] = str) -> Any:
        if trained is None:
            return given
        if given is None:
            took.append(f'{label}{show(trained)} ({field})')
            return trained
        if json.dumps(given, default=str) != json.dumps(trained, default=str):  # (1, 1) and [1, 1] are alike
            notes.append(f"{label}{show(given)} (given) overrides {show(trained)} from the checkpoint's {field}")
        return given

    model_name = merge('model ', model_name, args.get('model') or None, 'args.model')
    if model_name is None:
        raise ValueError("No model name given, and the checkpoint's training args name none (args.model); give it "
                         '(--model / model_name)')
    size = args.get('input_size')  # before img_size, as train.py's data config resolves them
    valid = isinstance(size, (list, tuple)) and len(size) == 3
    if size is not None and not valid and img_size is None:  # (a given size replaces it anyway)
        raise ValueError(f"The checkpoint's training args hold input_size={size!r}, not [channels, height, width]; "
                         'give the size it was trained at (--img-size / img_size)')
    trained_size, field = ((tuple(size[1:]), f'args.input_size {list(size)}') if valid
                           else (_hw(args.get('img_size')), 'args.img_size'))
    img_size = merge('input size ', img_size, trained_size, field, lambda s: ' x '.join(map(str, dict.fromkeys(s))))
    kwargs = args.get('model_kwargs') or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"The checkpoint's training args hold model_kwargs={kwargs!r}, not a dict of keyword "
                         'arguments; give them as --model-args / model_args')
    fields = dict.fromkeys(kwargs, 'args.model_kwargs')
    if args.get('gp') and 'global_pool' not in kwargs:  # train.py's --gp: its global_pool
        kwargs, fields['global_pool'] = {**kwargs, 'global_pool': args['gp']}, 'args.gp'
    for key, value in kwargs.items():
        model_args[key] = merge(f'model arg {key}=', model_args.get(key), value, fields[key], repr)
    return model_name, model_args, img_size, took, notes


def export_for_hub(checkpoint: Union[str, Path], output: Union[str, Path], model_name: Optional[str] = None,
                   num_classes: Optional[int] = None, model_args: Optional[Dict[str, Any]] = None,
                   label_names: Optional[Sequence[str]] = None, dataset: Optional[Union[str, Sequence[str]]] = None,
                   repo_id: Optional[str] = None, overwrite: bool = False, img_size: Optional[Size] = None
                   ) -> Dict[str, Any]:
    """`timm-halo hub-export`: a checkpoint as a save_for_hf folder with a card, checked to reload (docs/hub.md)."""
    output, model_args = Path(output), dict(model_args or {})
    if output.exists() and not (output.is_dir() and (overwrite or not any(output.iterdir()))):
        raise ValueError(f"Output '{output}' is a file, or a folder that is not empty: choose a new folder, or pass "
                         '--overwrite (overwrite=True) to write into it (files of the same names are replaced)')
    weights = read_checkpoint(checkpoint)
    # the args timm's train.py stores with the weights (timm's reader allows its Namespace)
    raw = {} if str(checkpoint).endswith('.safetensors') else _torch_load(str(checkpoint), mmap=is_zipfile(checkpoint))
    args = raw.get('args') if isinstance(raw, dict) else None
    train_args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    model_name, model_args, img_size, took, notes = _apply_train_args(train_args, model_name, model_args, _hw(img_size))
    if problem := export_args_problem(model_name, model_args, img_size):
        raise ValueError(problem + (f"; taken from the checkpoint's training args: {'; '.join(took)}" if took else ''))
    # the classes and input channels are the weights': the classifier's outputs, the stem's (ours / timm's ByobNet)
    head, stem = weights.get('head.fc.weight'), weights.get('stem.0.conv.weight', weights.get('stem.conv1.conv.weight'))
    ckpt_classes = head.shape[0] if head is not None else 0
    trained_classes = train_args.get('num_classes')
    if _is_count(trained_classes) and trained_classes != ckpt_classes:
        notes.append(f"the checkpoint's args.num_classes is {trained_classes} but its classifier has {ckpt_classes} "
                     'outputs; the classifier is what is exported')
    elif _is_count(trained_classes) and num_classes is None:
        took.append(f'{trained_classes} classes (args.num_classes, as its classifier has)')
    num_classes = ckpt_classes if num_classes is None else num_classes
    if num_classes not in (0, ckpt_classes):
        raise ValueError(
            f"The checkpoint's classifier has {ckpt_classes} classes but num_classes={num_classes}: exporting it "
            "would publish a randomly initialised classifier. Use the checkpoint's count, or 0 to drop the head.")
    if stem is not None:
        model_args.setdefault('in_chans', stem.shape[1])
    h, w = img_size or timm.models.get_pretrained_cfg(model_name).input_size[1:]
    overlay = dict(file=str(checkpoint), num_classes=ckpt_classes, input_size=(model_args.get('in_chans', 3), h, w),
                   pool_size=(-(-h // 32), -(-w // 32)))  # the final map at that size (stride-2 stages round up)
    model = timm.create_model(
        model_name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes, **model_args).eval()
    save_for_hf(model, output, safe_serialization=True, model_config={
        'pretrained_cfg': {'tag': None},  # the exported weights are not 'untrained'
        'label_names': list(label_names) if label_names is not None else None})
    folder_name = output.resolve().name
    readme = generate_readme(model_card(model, repo_id=repo_id, dataset=dataset, local_dir=folder_name),
                             (repo_id or folder_name).split('/')[-1])
    (output / 'README.md').write_text(readme, encoding='utf-8')

    # The folder must reload through timm's own local-dir: path and compute the same function.
    reloaded = timm.create_model(f'local-dir:{output}', pretrained=True).eval()
    x = torch.randn(1, model.in_chans, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(x) - reloaded(x)).abs().max().item()
    if diff != 0:
        raise RuntimeError(f"The exported folder '{output}' reloads with different outputs (max |diff| {diff:g})")
    return dict(output=str(output), files=sorted(p.name for p in output.iterdir()),
                architecture=model.pretrained_cfg['architecture'], params=sum(p.numel() for p in model.parameters()),
                num_classes=model.num_classes, in_chans=model.in_chans, reload_max_abs_diff=diff,
                input_size=tuple(model.pretrained_cfg['input_size']), from_checkpoint=took, notes=notes)


def inspect_hub_model(source: str, load: bool = True) -> Dict[str, Any]:
    """`timm-halo hub-inspect`: config, files and (with ``load``) the model timm builds, of a folder or Hub repo."""
    kind, ident = (('local-dir', source) if os.path.isdir(source) else source.split(':', 1) if ':' in source
                   else ('hf-hub', source))
    if kind not in ('hf-hub', 'local-dir') or ':' not in source and kind == 'hf-hub' and (
            source.count('/') != 1 or source.startswith(('.', '/'))):  # a bare 'org/name' is a Hub repo
        raise ValueError(f"'{source}' is neither an existing folder nor a Hub repo id like 'org/name'")
    where = f"config.json of {'local folder' if kind == 'local-dir' else 'Hugging Face Hub repo'} '{ident}'"
    try:  # a Hub repo's config.json lands in the cache's snapshot folder, where the weights go too
        folder = Path(download_from_hf(ident, 'config.json')).parent if kind == 'hf-hub' else Path(ident)
        raw = load_cfg_from_json(folder / 'config.json')
    except Exception as e:  # not there (offline, no such repo or file), unreadable, invalid JSON or UTF-8
        raise PretrainedWeightsError(f'Could not get {where}: {_pretrained.hub_problem(e)}') from e
    check_hub_config(raw, where)
    cfg, arch, model_args = load_model_config_from_path(folder)  # timm's own reading of it
    info: Dict[str, Any] = dict(
        source=f'{kind}:{ident}', architecture=arch, num_classes=cfg.get('num_classes'), model_args=model_args,
        label_names=len(cfg.get('label_names') or ()), warnings=list(filter(None, [num_classes_conflict(raw, where)])),
        pretrained_cfg={k: v for k, v in cfg.items() if k not in ('file', 'source', 'hf_hub_id')},
        notes=[] if 'num_classes' not in raw.get('model_args', {}) else [
            "transformers (AutoModel, pipeline) cannot load it: its model_args hold num_classes, which "
            "transformers' timm wrapper passes a second time; timm_halo.hub.fix_hub_config(folder) removes it "
            '(timm.create_model is unaffected), and timm_halo.hub.save_for_hf / push_to_hf_hub write it without'])
    if load:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                model = timm.create_model(f'{kind}:{ident}', pretrained=True).eval()
        except (TypeError, ValueError) as e:  # the constructor refused model_args (weight errors are ours)
            raise PretrainedWeightsError(
                f'Could not build {arch} from {where}: its model_args {json.dumps(model_args)} are refused: {e}') from e
        info['warnings'] += [m for m in dict.fromkeys(str(w.message) for w in caught) if m not in info['warnings']]
        facts = describe_model(model)
        info.update(
            # timm discards the weights' classifier when the model's classes differ from the cfg's (see the warning)
            classifier_reinitialised=bool(model.num_classes != cfg.get('num_classes')),
            num_classes_built=model.num_classes, params=facts['params'], gmacs=facts['gmacs'],
            weights_finite=all(bool(t.isfinite().all()) for t in model.state_dict().values() if t.is_floating_point()),
            settings={k: facts[k] for k in ('block_size', 'halo_size', 'heads', 'value_ratio', 'out_ratio', 'depths',
                                            'widths', 'final_conv')})
    # files present locally (for a Hub repo: those in the cache snapshot, i.e. what has been downloaded)
    info['files'] = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    return info
