"""HaloNet H0-H7 of `Scaling Local Self-Attention for Parameter Efficient Visual Backbones` (arXiv:2103.12731)."""
# The design choices the paper leaves open are listed in README.md.
import math
import numbers
import re
import warnings
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import BatchNormAct2d, ClassifierHead, ConvNormAct, DropPath, create_act_layer, trunc_normal_
from timm.layers.drop import calculate_drop_path_rates
from timm.layers.helpers import get_device_dtype
from timm.models import build_model_with_cfg, checkpoint_seq, clean_state_dict, named_apply, register_notrace_function
from timm.models._features import feature_take_indices
from timm.models._registry import generate_default_cfgs, is_model, model_entrypoint, register_model

from timm_halo.layers import HaloAttention
from timm_halo.layers.halo_attention import check_image_input, check_int

from ._pretrained import PretrainedWeightsError, build_pretrained, warn_if_classifier_dropped

__all__ = ['HaloNet', 'halonet_args']

PAPER_TITLE = 'Scaling Local Self-Attention for Parameter Efficient Visual Backbones'

# The paper's family, the one table of its numbers: block size b, halo h, value ratio rv, bottleneck ratio rb,
# stage-3 depth l3, final conv width df (0: none), input size s; the paper's params (millions) and ImageNet top-1.
# README's family table and the tests are checked against it.
FAMILY: Dict[str, Dict[str, Any]] = {
    name: dict(zip(('b', 'h', 'rv', 'rb', 'l3', 'df', 's', 'params_m', 'top1'), row)) for name, row in {
        #              b   h   rv    rb    l3  df    s    params top-1
        'halonet_h0': (8, 3, 1.0, 0.5, 7, 0, 256, 5.5, 77.9),
        'halonet_h1': (8, 3, 1.0, 1.0, 10, 0, 256, 8.1, 79.9),
        'halonet_h2': (8, 3, 1.0, 1.25, 11, 0, 256, 9.4, 80.4),
        'halonet_h3': (10, 3, 1.0, 1.5, 12, 1024, 320, 11.8, 81.9),
        'halonet_h4': (12, 2, 1.0, 3.0, 12, 1280, 384, 19.1, 83.3),
        'halonet_h5': (14, 2, 2.5, 2.0, 23, 1536, 448, 30.7, 84.0),
        'halonet_h6': (8, 4, 3.0, 2.75, 24, 1536, 512, 43.4, 84.4),
        'halonet_h7': (10, 3, 4.0, 3.5, 26, 2048, 600, 67.4, 84.9),
    }.items()
}
PAPER_PARAMS_M = {name: f['params_m'] for name, f in FAMILY.items()}
PAPER_TOP1 = {name: f['top1'] for name, f in FAMILY.items()}


def halonet_args(variant: str) -> Dict[str, Any]:
    """Constructor kwargs of `HaloNet` for one of the paper's models, e.g. ``halonet_args('halonet_h1')``."""
    if variant not in FAMILY:
        raise ValueError(f'Unknown HaloNet variant {variant!r}; known: {", ".join(FAMILY)}')
    f = FAMILY[variant]
    return dict(depths=(3, 3, f['l3'], 3), block_size=f['b'], halo_size=f['h'], value_ratio=f['rv'],
                out_ratio=f['rb'], num_features=f['df'])


# HaloNet's kwargs checked up front, named in the error with a hint: name -> (lowest value, hint) for integers,
# (example, hint) for the per-stage lists, hint for the ratios, allowed range for the rates (0 to 1).
_INT_ARGS = dict(
    stem_chs=(1, 'stem conv width'), in_chans=(1, 'input image channels'), num_classes=(0, '0 for no classifier'),
    num_features=(0, 'width of the final 1x1 conv; 0 for none'), heads=(1, 'attention heads per block'),
    block_size=(1, 'halo attention block size b'), halo_size=(0, 'halo h; 0 for none'))
_STAGE_ARGS = dict(
    depths=('(3, 3, 10, 3)', 'blocks in that stage; its first block downsamples, so a stage cannot be empty: '
                             'to drop a stage, remove its entry from both depths and widths'),
    widths=('(64, 128, 256, 512)', 'query/key width of that stage'))
_RATIO_ARGS = dict(out_ratio="the paper's rb, e.g. 1.0: block output width = round(width * out_ratio)",
                   value_ratio="the paper's rv, e.g. 1.0: value width = round(width * value_ratio)")
_RATE_ARGS = dict(drop_path_rate='0 to 1', bn_momentum="0 to 1, or None for PyTorch's 0.1")


def _check_stages(name: str, values: Any) -> Tuple[int, ...]:
    """A non-empty sequence of integers >= 1, one per stage (depths, widths)."""
    example, hint = _STAGE_ARGS[name]
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f'HaloNet: {name} must be a sequence with one integer per stage, e.g. {name}={example}; '
                        f'got {values!r} of type {type(values).__name__}')
    if not len(values):
        raise ValueError(f'HaloNet: {name} must name at least one stage, e.g. {name}={example}; got {tuple(values)}')
    for i, value in enumerate(values):
        check_int('HaloNet', f'{name}[{i}] of {tuple(values)}', value, 1, hint)
    return tuple(values)


def _check_model_args(args: Dict[str, Any]) -> None:
    """Validate HaloNet's constructor kwargs (``args``) before any layer is built, naming the kwarg and the fix."""
    depths, widths = _check_stages('depths', args['depths']), _check_stages('widths', args['widths'])
    if len(depths) != len(widths):
        raise ValueError(f'HaloNet: depths {depths} and widths {widths} must have the same length (one per stage)')
    for name, (lowest, hint) in _INT_ARGS.items():
        check_int('HaloNet', name, args[name], lowest, hint)
    block_size, heads, out_ratio, value_ratio = (args[k] for k in ('block_size', 'heads', 'out_ratio', 'value_ratio'))
    if len(depths) > 1 and block_size % 2:
        raise ValueError(f'HaloNet: block_size must be even, got {block_size}: every stage after the first '
                         f'downsamples with stride-2 attention, which needs blocks divisible by the stride; use e.g. '
                         f'block_size={block_size + 1}')
    for name, hint in _RATIO_ARGS.items():
        message = f'HaloNet: {name} must be a finite number > 0 ({hint}), got {args[name]!r}'
        if isinstance(args[name], bool) or not isinstance(args[name], numbers.Real):
            raise TypeError(f'{message} of type {type(args[name]).__name__}')
        if not math.isfinite(args[name]) or args[name] <= 0:
            raise ValueError(message)
    for name, allowed in _RATE_ARGS.items():
        if isinstance(args[name], numbers.Real) and not isinstance(args[name], bool) and not 0 <= args[name] <= 1:
            raise ValueError(f'HaloNet: {name} must be {allowed}, got {args[name]!r}')
    if not isinstance(args['qkv_bias'], bool):  # 'no' would be truthy: biases the caller did not ask for
        raise TypeError(f"HaloNet: qkv_bias must be True or False, got {args['qkv_bias']!r}")
    for i, width in enumerate(widths):
        if width % heads:
            raise ValueError(f'HaloNet: widths[{i}]={width} is not divisible by heads={heads} (each head gets width '
                             f'/ heads channels); use widths that are multiples of {heads}, or another number of heads')
        if int(round(width * out_ratio)) < 1:
            raise ValueError(f'HaloNet: out_ratio={out_ratio} leaves stage {i} (width {width}) with round({width} * '
                             f'{out_ratio}) = 0 output channels; use out_ratio >= {1 / width:.3g} or wider widths')
        if int(round(width // heads * value_ratio)) < 1:
            raise ValueError(f'HaloNet: value_ratio={value_ratio} leaves stage {i} (width {width}, {heads} heads of '
                             f'{width // heads} channels) with no value channels per head; use value_ratio >= '
                             f'{1 / (width // heads):.3g}')


class HaloBottleneck(nn.Module):
    """Bottleneck block with halo attention as its spatial op."""

    def __init__(self, in_chs: int, width: int, out_chs: int, stride: int = 1, heads: int = 8, value_ratio: float = 1.0,
                 act_layer: Union[str, Callable] = 'relu', drop_path: float = 0., device=None, dtype=None,
                 **attn_kwargs: Any):  # HaloAttention's block_size, halo_size, qkv_bias, attn_impl
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.shortcut = nn.Identity() if in_chs == out_chs and stride == 1 else ConvNormAct(
            in_chs, out_chs, 1, stride=stride, apply_act=False, **dd)
        self.conv1 = ConvNormAct(in_chs, width, 1, act_layer=act_layer, **dd)
        self.attn = HaloAttention(width, dim_head=width // heads, heads=heads, dim_out=int(round(width * value_ratio)),
                                  stride=stride, value_ratio=value_ratio, **attn_kwargs, **dd)
        self.post_attn = BatchNormAct2d(self.attn.dim_out, act_layer=act_layer, **dd)
        self.conv3 = ConvNormAct(self.attn.dim_out, out_chs, 1, apply_act=False, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.act = create_act_layer(act_layer, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.post_attn(self.attn(self.conv1(x))))
        return self.act(self.drop_path(out) + self.shortcut(x))


class HaloStage(nn.Module):
    """A sequence of halo bottlenecks; the first one carries the stage's stride."""

    def __init__(self, in_chs: int, width: int, out_chs: int, depth: int, stride: int,
                 drop_path_rates: List[float], **block_kwargs):
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*[
            HaloBottleneck(in_chs if i == 0 else out_chs, width, out_chs, stride=stride if i == 0 else 1,
                           drop_path=drop_path_rates[i], **block_kwargs) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class HaloNet(nn.Module):
    """HaloNet backbone with the timm model API; its kwargs and feature levels: docs/contract.md."""

    def __init__(
            self, depths: Tuple[int, ...] = (3, 3, 10, 3), widths: Tuple[int, ...] = (64, 128, 256, 512),
            block_size: int = 8, halo_size: int = 3, value_ratio: float = 1.0, out_ratio: float = 1.0,
            num_features: int = 0, heads: int = 8, stem_chs: int = 64, in_chans: int = 3, num_classes: int = 1000,
            global_pool: str = 'avg', drop_rate: float = 0., drop_path_rate: float = 0.,
            act_layer: Union[str, Callable] = 'relu', qkv_bias: bool = False, attn_impl: Optional[str] = None,
            zero_init_last: bool = True, bn_momentum: Optional[float] = None, bn_eps: Optional[float] = None,
            drop_block_rate: float = 0., device=None, dtype=None,
    ):
        super().__init__()
        if drop_block_rate:
            raise ValueError(f'HaloNet has no DropBlock layers: drop_block_rate must be 0, got {drop_block_rate}')
        _check_model_args(locals())
        dd, self.grad_checkpointing = {'device': device, 'dtype': dtype}, False
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate

        self.stem = nn.Sequential(ConvNormAct(in_chans, stem_chs, 7, stride=2, act_layer=act_layer, **dd),
                                  nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        # level 0: the stem conv's output before the max pool (ResNet's act1, ByobNet's stem.conv1)
        self.feature_info = [dict(num_chs=stem_chs, reduction=2, module='stem.0')]
        in_chs, dpr, stages = stem_chs, calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True), []
        for i, (depth, width) in enumerate(zip(depths, widths)):
            out_chs = int(round(width * out_ratio))
            stages.append(HaloStage(
                in_chs, width, out_chs, depth=depth, stride=1 if i == 0 else 2, drop_path_rates=dpr[i],
                block_size=block_size, halo_size=halo_size, heads=heads, value_ratio=value_ratio, qkv_bias=qkv_bias,
                attn_impl=attn_impl, act_layer=act_layer, **dd))
            in_chs = out_chs
            self.feature_info.append(dict(num_chs=out_chs, reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        self.final_conv = nn.Identity()
        if num_features:
            self.final_conv = ConvNormAct(in_chs, num_features, 1, act_layer=act_layer, **dd)
            self.feature_info[-1] = dict(self.feature_info[-1], num_chs=num_features, module='final_conv')
        self.num_features = self.head_hidden_size = num_features or in_chs
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)

        named_apply(partial(_init_weights, zero_init_last=zero_init_last), self)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = module.momentum if bn_momentum is None else bn_momentum
                module.eps = module.eps if bn_eps is None else bn_eps

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        fine = [(r'^stages\.(\d+)\.blocks\.(\d+)', None), (r'^final_conv', (99999,))]
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)' if coarse else fine)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # Relative position tables act like embeddings: keep them out of weight decay.
        return {n for n, _ in self.named_parameters() if n.endswith(('rel_pos_h', 'rel_pos_w'))}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        # the new classifier lives on the model's device, in its dtype
        self.head.reset(num_classes, global_pool, in_features=self.num_features, **get_device_dtype(self))

    def forward_intermediates(
            self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
            stop_early: bool = False, output_fmt: str = 'NCHW', intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's forward_intermediates; ``indices`` are feature levels (0 the stem, i stage i); ``norm`` unused."""
        if output_fmt != 'NCHW':
            raise ValueError(f"HaloNet intermediates are NCHW only, got output_fmt={output_fmt!r}")
        take_indices, max_index = _take_indices(indices, len(self.stages), 'indices')
        check_image_input(x, self.in_chans, self.stem[0].conv.weight.dtype, 'HaloNet')
        x, stem_feature = self._stem_forward(x, keep_feature=0 in take_indices)
        intermediates = [] if stem_feature is None else [stem_feature]
        for level, stage in enumerate(self.stages[:max_index] if stop_early else self.stages, 1):
            x = stage(x)
            if level == len(self.stages):
                x = self.final_conv(x)  # feature_info names final_conv as the last feature (as timm's ByobNet)
            if level in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
            self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> List[int]:
        """Prune layers not required for the feature levels ``indices``; returns the absolute indices kept."""
        take_indices, max_index = _take_indices(indices, len(self.stages), 'indices')
        prune_end = max_index < len(self.stages)
        self.stages = self.stages[:max_index]  # stage i is level i + 1
        if max_index == 0:
            self.stem[1] = nn.Identity()  # the max pool follows the stem feature (no parameters)
        if prune_end:
            self.final_conv = nn.Identity()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # Fail at the door with the model's name rather than deep in a conv or in timm's BatchNormAct2d assert.
        check_image_input(x, self.in_chans, self.stem[0].conv.weight.dtype, 'HaloNet')
        return self.final_conv(self.stages(self._stem_forward(x)[0]))  # stages checkpoint their own blocks

    def _stem_forward(self, x: torch.Tensor, keep_feature: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The stem's conv + BN + ReLU and max pool, and (if kept) the conv's output, in the input's memory layout."""
        feature = self.stem[0](cpu_channels_last(x))
        kept = in_layout_of(feature, x) if keep_feature else None
        return in_layout_of(self.stem[1](feature), x), kept

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_notrace_function  # torch.fx calls it whole (it reads the device): wrapped only without a leading _
def cpu_channels_last(x: torch.Tensor) -> torch.Tensor:
    # The stem runs channels-last on CPU: ATen's CPU max pool took 5 ms on a 64 x 128 x 128 NCHW map, 0.3 ms NHWC.
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == 'cpu' else x


@register_notrace_function  # torch.fx calls it whole: it reads the layout
def in_layout_of(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    channels_last = like.is_contiguous(memory_format=torch.channels_last)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _init_weights(module: nn.Module, name: str = '', zero_init_last: bool = False) -> None:
    # HaloAttention initialises its own q / kv projections and position tables.
    if isinstance(module, (nn.Conv2d, nn.Linear)) and not name.endswith(('attn.q', 'attn.kv')):
        linear = isinstance(module, nn.Linear)
        # kaiming's default gain (leaky_relu, a=0) is relu's
        trunc_normal_(module.weight, std=.02) if linear else nn.init.kaiming_normal_(module.weight, mode='fan_out')
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif zero_init_last and isinstance(module, HaloBottleneck):  # the residual branch starts as the identity
        nn.init.zeros_(module.conv3.bn.weight)


# timm's ByobNet `halonet_h1` (timm.models.byoanet) -> ours: the same tensors under other names, renamed in order.
_BYOBNET_RENAMES = (
    (r'^stem\.conv1\.', 'stem.0.'), (r'^stages\.(\d+)\.(\d+)\.', r'stages.\1.blocks.\2.'),
    (r'\.(conv[13])_1x1\.', r'.\1.'), (r'\.self_attn\.pos_embed\.height_rel$', '.attn.rel_pos_h'),
    (r'\.self_attn\.pos_embed\.width_rel$', '.attn.rel_pos_w'), (r'\.self_attn\.', '.attn.'))


def _from_timm_byobnet(state_dict: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A timm ByobNet halo-attention state dict renamed to ours (docs/hub.md)."""
    # its relative tables lose their 2h leading rows, which no query uses
    out = {}
    for key, value in state_dict.items():
        for old, new in _BYOBNET_RENAMES:
            key = re.sub(old, new, key)
        if key.endswith(('.attn.rel_pos_h', '.attn.rel_pos_w')) and key in target:
            value = value[max(value.shape[0] - target[key].shape[0], 0):]
        out[key] = value
    return out


def _check_matches(state_dict: Dict[str, torch.Tensor], model: nn.Module, target: Dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint that would load only partially; the classifier and first conv's channels are timm's."""
    # timm loads non-strictly whenever num_classes changes, and would then say so only in a log line
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    classifiers = _names(cfg.get('classifier') or 'head.fc')
    first_convs = {f'{c}.weight' for c in _names(cfg.get('first_conv') or 'stem.0.conv')}

    def body(keys) -> List[str]:  # the keys not of the classifier
        return [k for k in keys if k.rsplit('.', 1)[0] not in classifiers]

    def listing(title: str, keys: List[str]) -> str:
        keys = sorted(keys, key=lambda k: k.endswith('num_batches_tracked'))  # the telling keys first
        shown = ', '.join(keys[:8]) + (f', ... ({len(keys) - 8} more)' if len(keys) > 8 else '')
        return f'\n  {len(keys)} {title}: {shown}' if keys else ''

    if problems := (listing('missing keys', body(k for k in target if k not in state_dict))
                    + listing('unexpected keys', body(k for k in state_dict if k not in target))
                    + listing('shape mismatches', [
                        f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(target[k].shape)}'
                        for k in body(state_dict) if k in target and k not in first_convs
                        and tuple(state_dict[k].shape) != tuple(target[k].shape)])):
        raise PretrainedWeightsError(
            f"the checkpoint does not match {cfg.get('architecture') or type(model).__name__} as built (another "
            f'architecture, or other model kwargs such as depths?); refusing a partial load.{problems}')


def _names(value: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module, strict: bool = True) -> Dict[str, torch.Tensor]:
    """A checkpoint (ours or timm's ByobNet, training containers unwrapped) for ``model``; docs/hub.md."""
    state_dict = next((state_dict[k] for k in ('state_dict_ema', 'model_ema', 'state_dict', 'model')
                       if isinstance(state_dict.get(k), dict)), state_dict)  # a training container's weights
    cleaned, target = clean_state_dict(state_dict), model.state_dict()  # DDP / torch.compile prefixes
    if any(k.startswith('stem.conv1.') or '.self_attn.' in k for k in cleaned):  # timm's ByobNet layout
        cleaned = _from_timm_byobnet(cleaned, target)
    if strict:
        _check_matches(cleaned, model, target)
    warn_if_classifier_dropped(cleaned, model)
    return cleaned


def _take_indices(out_indices: Any, num_stages: int, name: str = 'out_indices') -> Tuple[List[int], int]:
    """timm's ``feature_take_indices`` over the stem (level 0) and the stages, a bad index named in the error."""
    # timm raises a bare IndexError / AssertionError
    levels = num_stages + 1
    layout = (f'this HaloNet has {levels} feature levels, the stem (0, reduction 2) and {num_stages} '
              f'stage{"s" if num_stages > 1 else ""} (1 to {num_stages})')

    def is_int(value: Any) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if out_indices is None:
        pass
    elif is_int(out_indices):  # timm: an int n means the last n levels
        if not 1 <= out_indices <= levels:
            raise ValueError(f'{name}={out_indices} (the last n levels) must be 1 to {levels}: {layout}')
    elif isinstance(out_indices, (str, bytes)) or not isinstance(out_indices, Sequence) or not all(
            map(is_int, out_indices)):
        raise TypeError(f'{name} must be an int n (the last n levels) or a sequence of int levels, got '
                        f'{out_indices!r}; {layout}')
    elif not len(out_indices) or any(not -levels <= i < levels for i in out_indices):
        raise ValueError(f'{name} {tuple(out_indices)} out of range: {layout}, so valid indices are 0 to '
                         f'{levels - 1} (or -{levels} to -1)')
    return feature_take_indices(levels, out_indices)


def _create_halonet(variant: str, pretrained: bool = False, **kwargs) -> HaloNet:
    model_args = {**halonet_args(variant), **kwargs}
    num_stages = len(_check_stages('depths', model_args['depths']))  # before out_indices are checked against it
    if model_args.get('features_only') and 'out_indices' in model_args:
        _take_indices(model_args['out_indices'], num_stages)
    build = partial(
        build_model_with_cfg, HaloNet, variant, pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, strict=model_args.get('pretrained_strict', True)),
        # all levels by default: the stem (0) and every stage, as timm's ResNet / ByobNet (0, 1, 2, 3, 4)
        feature_cfg=dict(out_indices=tuple(range(num_stages + 1)), flatten_sequential=True), **model_args)
    # timm's loader errors are terse: check the weights first, naming the architecture, source and fix
    return build_pretrained(build, variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay')
                            ) if pretrained else build()


def _cfg(img_size: int) -> Dict[str, Any]:
    return dict(  # pool_size: stride-2 stages round up
        url='', num_classes=1000, input_size=(3, img_size, img_size), pool_size=(-(-img_size // 32),) * 2,
        min_input_size=(3, 32, 32), crop_pct=0.95, interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD, first_conv='stem.0.conv', classifier='head.fc', paper_ids='arXiv:2103.12731',
        paper_name=PAPER_TITLE)


# Untrained cfgs only: add a cfg with its hf_hub_id here when weights are published.
default_cfgs = generate_default_cfgs({f'{name}.untrained': _cfg(f['s']) for name, f in FAMILY.items()})


def _register(name: str) -> Callable[..., HaloNet]:
    """Register the entrypoint ``name`` of FAMILY; quietly replaces timm's ByobNet `halonet_h1` and our own."""
    # timm's is untrained (see README); ours is registered again on a reload; any other clash still warns
    def entrypoint(pretrained: bool = False, **kwargs) -> HaloNet:
        return _create_halonet(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f'HaloNet-H{name[-1]} of the paper: ' + ', '.join(f'{k}={v}' for k, v in FAMILY[name].items())
    with warnings.catch_warnings():
        if name == 'halonet_h1' or is_model(name) and model_entrypoint(name).__module__ == __name__:
            warnings.filterwarnings('ignore', message=rf'Overwriting {name} in registry')
        return register_model(entrypoint)


# The entrypoints halonet_h0 ... halonet_h7, as module attributes (timm's registry and pickling find them here).
for _name in FAMILY:
    globals()[_name] = _register(_name)
