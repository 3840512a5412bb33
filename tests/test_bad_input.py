"""Catalogue of bad and edge-case inputs to HaloAttention and the halonet_* models: one `Case` row each.

A failing row gives the exact exception type and `names`, the words its message must name (whole words,
case-insensitive): the offending argument or thing and, where useful, its value or the fix, not the sentence.
Every message must also name its owner, `HaloAttention` for a 'layer:' row and `HaloNet` for a 'model:' row,
so no row passes on an error of Python's or timm's alone. A working row gives `check`, called with what `run`
returned and holding it to an independent reference. docs/bad-input.md has one line per row
(test_docs_list_every_case keeps the two in step).
"""
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Tuple, Union

import numpy as np
import pytest
import timm
import torch

import timm_halo  # noqa: F401  (registers the halonet_* models with timm)
from timm_halo import HaloAttention
from timm_halo.layers import fused_cpu

DOC = Path(__file__).resolve().parents[1] / 'docs' / 'bad-input.md'
OWNERS = {'layer': 'HaloAttention', 'model': 'HaloNet'}


@dataclass(frozen=True)
class Case:
    name: str  # 'layer: ...' or 'model: ...'
    run: Callable[[], Any]
    error: Optional[type] = None
    names: Union[str, Tuple[str, ...]] = ()  # what the message names: one word, or several that must all appear
    check: Optional[Callable[[Any], None]] = None

    @property
    def words(self) -> Tuple[str, ...]:
        return (self.names,) if isinstance(self.names, str) else tuple(self.names)


def _layer(**kwargs) -> HaloAttention:
    torch.manual_seed(0)
    return HaloAttention(16, **{**dict(block_size=4, halo_size=1, heads=2, dim_head=8), **kwargs}).eval()


def _model(name: str = 'halonet_h0', **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    small = dict(depths=(1, 1, 1, 1), widths=(16, 32, 64, 64), stem_chs=16, num_classes=5, zero_init_last=False)
    return timm.create_model(name, **{**small, **kwargs}).eval()


def _call(build: Callable[[], torch.nn.Module], x: torch.Tensor, method: str = '__call__', **kwargs):
    """Build a module, then call `method` on `x` without autograd."""
    def run():
        with torch.no_grad():
            return getattr(build(), method)(x, **kwargs)
    return run


def _layer_vs_reference(layer: HaloAttention, *shape: int) -> Callable[[], Any]:
    def run():
        x = torch.randn(*shape)
        with torch.no_grad():
            return layer(x), layer.reference_forward(x), layer.output_size(*shape[-2:])
    return run


def _matches_reference(result) -> None:
    out, ref, (hq, wq) = result
    assert out.shape == ref.shape and out.shape[-2:] == (hq, wq)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def _empty_batch_layer():
    layer = _layer(stride=2)
    x = torch.randn(0, 16, 9, 7, requires_grad=True)
    out = layer(x)
    out.sum().backward()  # the tiled kernel's backward with no windows at all
    return out, x.grad


def _check_empty_batch_layer(result) -> None:
    out, grad = result
    assert out.shape == (0, 16, 5, 4) and grad.shape == (0, 16, 9, 7)


def _expected_nan_outputs(layer: HaloAttention, height: int, width: int, py: int, px: int) -> torch.Tensor:
    """(Hq, Wq) bool: output pixels whose query's block window contains input pixel (py, px)."""
    b, h, s = layer.block_size, layer.halo_size, layer.stride
    hq, wq = layer.output_size(height, width)
    # output row oy is query row oy * s, in the block starting at (oy * s // b) * b, whose window reaches h beyond
    rows = [(oy * s // b) * b - h <= py < (oy * s // b) * b + b + h for oy in range(hq)]
    cols = [(ox * s // b) * b - h <= px < (ox * s // b) * b + b + h for ox in range(wq)]
    return torch.tensor(rows)[:, None] & torch.tensor(cols)[None, :]


def _nan_pixel(stride: int, block: int, halo: int, py: int, px: int, path: str = 'auto') -> Callable[[], Any]:
    """``path``: a kernel of the implementation table, or 'reference' (the dense reference_forward)."""
    def run():
        if path == 'fused' and not fused_cpu.available():
            pytest.skip('no C compiler here to build the fused kernel')
        torch.manual_seed(0)
        layer = HaloAttention(16, block_size=block, halo_size=halo, heads=2, dim_head=8, stride=stride,
                              dim_out=24,  # with an output projection: it mixes channels, not pixels
                              attn_impl='auto' if path == 'reference' else path).eval()
        forward = layer.reference_forward if path == 'reference' else layer
        x = torch.randn(2, 16, 13, 11)
        poisoned = x.clone()
        poisoned[1, 3, py, px] = float('nan')
        with torch.no_grad():
            return forward(x), forward(poisoned), _expected_nan_outputs(layer, 13, 11, py, px)
    return run


def _check_nan_pixel(result) -> None:
    clean, out, expected = result
    assert expected.any() and not expected.all()  # the case discriminates
    assert not out[0].isnan().any()  # other images in the batch are untouched
    nan = out[1].isnan()
    assert torch.equal(nan, expected[None].expand_as(nan))  # exactly there, in every channel
    torch.testing.assert_close(out[1][~nan], clean[1][~nan], rtol=0, atol=1e-6)  # the rest as without the NaN


def _model_nan():
    x = torch.randn(2, 3, 48, 40)
    x[0, 1, 20, 7] = float('nan')
    return _call(_model, x)()


def _check_model_nan(logits) -> None:
    assert logits.shape == (2, 5)
    assert logits[0].isnan().all() and not logits[1].isnan().any()  # global pooling: every logit of that image


def _check_shape(*shape: int) -> Callable[[torch.Tensor], None]:
    def check(out: torch.Tensor) -> None:
        assert out.shape == shape and torch.isfinite(out).all(), out
    return check


def _check_equal(expected: Any) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        assert value == expected, value
    return check


def _x(*shape: int, dtype: torch.dtype = torch.float32, device: str = 'cpu') -> torch.Tensor:
    return torch.ones(*shape, dtype=dtype, device=device)


X = _x(1, 3, 32, 32)  # a model's input


CASES = [
    # -- HaloAttention: input tensor
    Case('layer: 3-D input', _call(_layer, _x(16, 8, 8)), ValueError, ('4-D', '3-D')),
    Case('layer: 5-D input', _call(_layer, _x(1, 1, 16, 8, 8)), ValueError, ('4-D', '5-D')),
    Case('layer: channels != dim', _call(_layer, _x(1, 15, 8, 8)), ValueError, ('channels', '16', '15')),
    Case('layer: float64 input, float32 parameters', _call(_layer, _x(1, 16, 8, 8, dtype=torch.float64)), TypeError,
         ('torch.float64', 'torch.float32')),
    Case('layer: float32 input, bfloat16 parameters', _call(lambda: _layer().to(torch.bfloat16), _x(1, 16, 8, 8)),
         TypeError, ('torch.float32', 'torch.bfloat16')),
    Case('layer: integer input', _call(_layer, _x(1, 16, 8, 8, dtype=torch.long)), TypeError,
         ('floating point', 'torch.int64')),
    Case('layer: bool input', _call(_layer, _x(1, 16, 8, 8, dtype=torch.bool)), TypeError,
         ('floating point', 'torch.bool')),
    Case('layer: empty image (H = 0)', _call(_layer, _x(1, 16, 0, 8)), ValueError, ('non-empty', '0 x 8')),
    Case('layer: empty batch (B = 0)', _empty_batch_layer, check=_check_empty_batch_layer),
    Case('layer: 1x1 map', _layer_vs_reference(_layer(), 2, 16, 1, 1), check=_matches_reference),
    Case('layer: 1xN map, strided', _layer_vs_reference(_layer(stride=2), 2, 16, 1, 9), check=_matches_reference),
    Case('layer: block larger than the map', _layer_vs_reference(_layer(block_size=8, halo_size=2), 2, 16, 3, 5),
         check=_matches_reference),
    Case('layer: halo larger than the block', _layer_vs_reference(_layer(block_size=2, halo_size=5), 2, 16, 7, 6),
         check=_matches_reference),
    Case('layer: NaN pixel, stride 1', _nan_pixel(1, 4, 1, 6, 3), check=_check_nan_pixel),
    Case('layer: NaN pixel, stride 2, off the query grid', _nan_pixel(2, 4, 2, 9, 5), check=_check_nan_pixel),
    Case('layer: NaN pixel, halo 0', _nan_pixel(1, 3, 0, 12, 10), check=_check_nan_pixel),
    *[Case(f'layer: NaN pixel, {path}', _nan_pixel(2, 4, 2, 9, 5, path), check=_check_nan_pixel)
      for path in ('fused', 'tiled', 'sdpa', 'broadcast', 'reference')],
    # -- HaloAttention: construction
    Case('layer: stride 3', lambda: _layer(stride=3), ValueError, ('stride', '3')),
    Case('layer: stride 2.0', lambda: _layer(stride=2.0), TypeError, ('stride', '2.0')),
    Case('layer: numpy stride and value_ratio', lambda: _layer(stride=np.int64(2), value_ratio=np.float32(0.5)),
         check=lambda layer: (type(layer.stride), layer.stride, layer.dim_head_v) == (int, 2, 4) or pytest.fail()),
    Case("layer: qkv_bias 'no'", lambda: _layer(qkv_bias='no'), TypeError, ('qkv_bias', 'no')),
    Case('layer: dim_out 0', lambda: _layer(dim_out=0), ValueError, ('dim_out', '0')),
    Case('layer: dim_out -3', lambda: _layer(dim_out=-3), ValueError, ('dim_out', '-3')),
    Case('layer: value_ratio nan', lambda: _layer(value_ratio=float('nan')), ValueError, ('value_ratio', 'nan')),
    Case('layer: value_ratio inf', lambda: _layer(value_ratio=float('inf')), ValueError, ('value_ratio', 'inf')),
    Case("layer: value_ratio '1'", lambda: _layer(value_ratio='1'), TypeError, ('value_ratio', 'str')),
    Case('layer: unknown attn_impl', lambda: _layer(attn_impl='flash'), ValueError, ('attn_impl', 'flash', 'tiled')),
    Case('layer: tiled on the meta device', _call(lambda: _layer(attn_impl='tiled', device='meta'),
                                                  _x(1, 16, 8, 8, device='meta')), RuntimeError,
         ("attn_impl='tiled'", 'cpu', 'meta')),
    Case('layer: fused on the meta device', _call(lambda: _layer(attn_impl='fused', device='meta'),
                                                  _x(1, 16, 8, 8, device='meta')), RuntimeError,
         ("attn_impl='fused'", 'cpu', 'meta')),
    Case('layer: block not divisible by stride', lambda: _layer(block_size=3, stride=2), ValueError,
         ('block_size', 'stride')),
    Case('layer: block_size 0', lambda: _layer(block_size=0), ValueError, ('block_size', '0')),
    Case('layer: negative halo', lambda: _layer(halo_size=-1), ValueError, ('halo_size', '-1')),
    Case('layer: non-integer size', lambda: _layer(block_size=4.0), TypeError, ('block_size', '4.0')),
    Case('layer: heads 0', lambda: _layer(heads=0), ValueError, ('heads', '0')),
    Case('layer: value_ratio leaves no channels', lambda: _layer(dim_head=2, value_ratio=0.1), ValueError,
         ('value_ratio', '0.1', 'dim_head')),
    # -- HaloNet models: input tensor
    Case('model: 3-D (unbatched) image', _call(_model, _x(3, 32, 32)), ValueError, ('4-D', '3-D')),
    Case('model: wrong channel count', _call(_model, _x(1, 4, 32, 32)), ValueError, ('channels', '3', '4')),
    Case('model: float64 image', _call(_model, X.double()), TypeError, ('torch.float64', 'torch.float32')),
    Case('model: uint8 image', _call(_model, X.to(torch.uint8)), TypeError, ('floating point', 'torch.uint8')),
    Case('model: forward_intermediates, float64', _call(_model, X.double(), 'forward_intermediates'), TypeError,
         ('torch.float64', 'torch.float32')),
    Case('model: empty batch (B = 0)', _call(_model, _x(0, 3, 32, 32)), check=_check_shape(0, 5)),
    Case('model: 1x1 image', _call(_model, torch.randn(2, 3, 1, 1)), check=_check_shape(2, 5)),
    Case('model: NaN pixel', _model_nan, check=_check_model_nan),
    # -- HaloNet models: feature levels (0 = the stem at reduction 2, 1-4 = the stages, as timm's ResNet)
    Case('model: features_only, out_indices too large', lambda: _model(features_only=True, out_indices=(1, 5)),
         ValueError, ('out_indices', '(1, 5)', '5 feature levels', '0 to 4')),
    Case('model: features_only, out_indices too negative', lambda: _model(features_only=True, out_indices=(-6,)),
         ValueError, ('out_indices', '(-6,)')),
    Case('model: features_only, out_indices=6 (last n)', lambda: _model(features_only=True, out_indices=6),
         ValueError, ('out_indices=6', '1 to 5')),
    Case('model: features_only, out_indices not ints', lambda: _model(features_only=True, out_indices=(1.0, 2)),
         TypeError, ('out_indices', '(1.0, 2)')),
    Case('model: features_only, out_indices of a 2-stage model',
         lambda: _model(features_only=True, depths=(1, 1), widths=(16, 32), out_indices=(3,)), ValueError,
         ('out_indices', '(3,)', '3 feature levels', '0 to 2')),
    Case('model: features_only, out_indices (2, 3, 4) are strides 8, 16, 32',
         lambda: _model(features_only=True, out_indices=(2, 3, 4)).feature_info.reduction(),
         check=_check_equal([8, 16, 32])),
    Case('model: forward_intermediates, index out of range', _call(_model, X, 'forward_intermediates', indices=[5]),
         ValueError, ('indices', '(5,)', '5 feature levels')),
    Case('model: forward_intermediates, last n out of range', _call(_model, X, 'forward_intermediates', indices=0),
         ValueError, ('indices=0', '1 to 5')),
    Case('model: prune_intermediate_layers, index out of range', lambda: _model().prune_intermediate_layers([-6]),
         ValueError, ('indices', '(-6,)')),
    # -- HaloNet models: construction (model kwargs are checked before any layer is built)
    Case('model: depths empty', lambda: _model(depths=(), widths=()), ValueError, ('depths', '()')),
    Case('model: depths empty, features_only', lambda: _model(depths=(), widths=(), features_only=True),
         ValueError, ('depths', '()')),
    Case('model: depths empty, features_only with out_indices',
         lambda: _model(depths=(), widths=(), features_only=True, out_indices=(0,)), ValueError, ('depths', '()')),
    Case('model: negative depth', lambda: _model(depths=(-1, 1, 1, 1)), ValueError, ('depths[0]', '-1')),
    Case('model: zero depth', lambda: _model(depths=(1, 0, 1, 1)), ValueError, ('depths[1]', '0', 'widths')),
    Case('model: depths not a sequence', lambda: _model(depths=4), TypeError, ('depths', '4')),
    Case('model: non-integer depth', lambda: _model(depths=(1, 1.5, 1, 1)), TypeError, ('depths[1]', '1.5')),
    Case('model: width 0', lambda: _model(widths=(16, 0, 64, 64)), ValueError, ('widths[1]', '0')),
    Case('model: negative width', lambda: _model(widths=(-16, 32, 64, 64)), ValueError, ('widths[0]', '-16')),
    Case('model: width not divisible by heads', lambda: _model(heads=3), ValueError, ('widths[0]', 'heads=3')),
    Case('model: out_ratio 0', lambda: _model(out_ratio=0), ValueError, ('out_ratio', '0')),
    Case('model: negative out_ratio', lambda: _model(out_ratio=-1.0), ValueError, ('out_ratio', '-1.0')),
    Case('model: out_ratio nan', lambda: _model(out_ratio=float('nan')), ValueError, ('out_ratio', 'nan')),
    Case('model: out_ratio leaves no channels', lambda: _model(out_ratio=0.01), ValueError,
         ('out_ratio', '0.01', 'out_ratio >= 0.0625')),
    Case('model: value_ratio nan', lambda: _model(value_ratio=float('nan')), ValueError, ('value_ratio', 'nan')),
    Case('model: value_ratio inf', lambda: _model(value_ratio=float('inf')), ValueError, ('value_ratio', 'inf')),
    Case('model: value_ratio not a number', lambda: _model(value_ratio='2'), TypeError, ('value_ratio', 'str')),
    Case('model: value_ratio leaves no value channels', lambda: _model(value_ratio=0.1), ValueError,
         ('value_ratio', '0.1', 'value_ratio >= 0.5')),
    Case('model: negative num_features', lambda: _model(num_features=-1), ValueError, ('num_features', '-1')),
    Case('model: heads 0', lambda: _model(heads=0), ValueError, ('heads', '0')),
    Case('model: stem_chs 0', lambda: _model(stem_chs=0), ValueError, ('stem_chs', '0')),
    Case('model: block_size 0', lambda: _model(block_size=0), ValueError, ('block_size', '0')),
    Case('model: odd block_size', lambda: _model(block_size=5), ValueError, ('block_size', 'even', 'block_size=6')),
    Case('model: odd block_size, one stage (no stride-2 stage)',
         lambda: _model(block_size=5, depths=(1,), widths=(16,)).stages[0].blocks[0].attn.block_size,
         check=_check_equal(5)),
    Case('model: negative halo_size', lambda: _model(halo_size=-1), ValueError, ('halo_size', '-1')),
    Case('model: float block_size', lambda: _model(block_size=4.0), TypeError, ('block_size', '4.0')),
    Case('model: in_chans 0', lambda: _model(in_chans=0), ValueError, ('in_chans', '0')),
    Case('model: negative num_classes', lambda: _model(num_classes=-1), ValueError, ('num_classes', '-1')),
    Case('model: misspelt kwarg', lambda: _model(halo_sise=2), TypeError, 'halo_sise'),
    Case("model: qkv_bias 'no'", lambda: _model(qkv_bias='no'), TypeError, ('qkv_bias', 'no')),
    Case('model: negative drop_path_rate', lambda: _model(drop_path_rate=-0.5), ValueError,
         ('drop_path_rate', '-0.5')),
    Case('model: bn_momentum 5.0', lambda: _model(bn_momentum=5.0), ValueError, ('bn_momentum', '5.0')),
    Case('model: depths and widths differ in length', lambda: _model(depths=(1, 1), widths=(8, 16, 32)),
         ValueError, ('depths', 'widths', 'length')),
    Case('model: intermediates in NHWC', _call(_model, X, 'forward_intermediates', output_fmt='NHWC'), ValueError,
         ('NCHW', 'NHWC')),
]


def _names(message: str, word: str) -> bool:
    return re.search(rf'(?<!\w){re.escape(word)}(?!\w)', message, re.I) is not None


@pytest.mark.parametrize('case', CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case):
    assert (case.error is None) != (case.check is None), 'a case gives either an error or a check'
    if case.check is not None:
        case.check(case.run())
        return
    assert case.words, 'a failing case says what its message names'
    with pytest.raises(Exception) as info:
        case.run()
    assert info.type is case.error, info.value  # exactly that type (no subclass, no AssertionError posing as one)
    message = str(info.value)
    missing = [w for w in (OWNERS[case.name.split(':')[0]], *case.words) if not _names(message, w)]
    assert not missing, f'{message!r} does not name {missing}'


def _doc_rows():
    """docs/bad-input.md's table rows: (case, raises, the message names)."""
    return re.findall(r'^\| ((?:layer|model): .+?) \| (.+?) \| (.*?) \|$', DOC.read_text(), re.M)


def test_docs_list_every_case():
    rows = _doc_rows()
    assert [name for name, _, _ in rows] == [case.name for case in CASES]  # each once, in the same order
    for case, (_, raises, names) in zip(CASES, rows):
        if case.error is None:
            assert raises == 'works', case.name
        else:
            assert raises == f'`{case.error.__name__}`', case.name
            assert re.findall(r'`([^`]+)`', names) == list(case.words), case.name
