"""Catalogue of bad and edge-case inputs: each row says what happens, an exception (type and message) or a result.

To add a case, append a `Case` to `CASES`: `run` performs the action; give `error` and `match` (a regex searched
in the message) for a failure, or `check` (called with what `run` returned) for a success. docs/bad-input.md lists
the same cases.
"""
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
import timm
import torch

import timm_halo  # noqa: F401  (registers the halonet_* models with timm)
from timm_halo import HaloAttention
from timm_halo.layers import fused_cpu


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[], Any]
    error: Optional[type] = None
    match: str = ''
    check: Optional[Callable[[Any], None]] = None


def _layer(**kwargs) -> HaloAttention:
    torch.manual_seed(0)
    args = dict(block_size=4, halo_size=1, heads=2, dim_head=8)
    return HaloAttention(16, **{**args, **kwargs}).eval()


def _model(name: str = 'halonet_h0', **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    small = dict(depths=(1, 1, 1, 1), widths=(16, 32, 64, 64), stem_chs=16, num_classes=5, zero_init_last=False)
    return timm.create_model(name, **{**small, **kwargs}).eval()


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


def _check_model_nan(logits) -> None:
    assert logits.shape == (2, 5)
    assert logits[0].isnan().all() and not logits[1].isnan().any()  # global pooling: every logit of that image


def _model_nan():
    model = _model()
    x = torch.randn(2, 3, 48, 40)
    x[0, 1, 20, 7] = float('nan')
    with torch.no_grad():
        return model(x)


def _check_shape(*shape: int, finite: bool = True) -> Callable[[torch.Tensor], None]:
    def check(out: torch.Tensor) -> None:
        assert out.shape == shape, out.shape
        assert not finite or torch.isfinite(out).all()
    return check


def _check_equal(expected: Any) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        assert value == expected, value
    return check


def _no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run():
        with torch.no_grad():
            return fn()
    return run


CASES = [
    # -- HaloAttention: input tensor
    Case('layer: 3-D input', lambda: _layer()(torch.randn(16, 8, 8)), ValueError, r'4-D NCHW tensor, got 3-D'),
    Case('layer: 5-D input', lambda: _layer()(torch.randn(1, 1, 16, 8, 8)), ValueError, r'got 5-D'),
    Case('layer: channels != dim', lambda: _layer()(torch.randn(1, 15, 8, 8)), ValueError,
         r'built for 16 input channels, got 15'),
    Case('layer: float64 input, float32 parameters', lambda: _layer()(torch.randn(1, 16, 8, 8).double()),
         TypeError, r'torch\.float64 input but its parameters are torch\.float32'),
    Case('layer: float32 input, bfloat16 parameters',
         lambda: _layer().to(torch.bfloat16)(torch.randn(1, 16, 8, 8)), TypeError,
         r'torch\.float32 input but its parameters are torch\.bfloat16'),
    Case('layer: integer input', lambda: _layer()(torch.ones(1, 16, 8, 8, dtype=torch.long)), TypeError,
         r'floating point input, got torch\.int64'),
    Case('layer: bool input', lambda: _layer()(torch.ones(1, 16, 8, 8, dtype=torch.bool)), TypeError,
         r'floating point input, got torch\.bool'),
    Case('layer: empty image (H = 0)', lambda: _layer()(torch.randn(1, 16, 0, 8)), ValueError,
         r'non-empty image, got H x W = 0 x 8'),
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
      for path in ('fused', 'tiled', 'sdpa', 'broadcast', 'reference')[0 if fused_cpu.available() else 1:]],
    # -- HaloAttention: construction
    Case('layer: stride 3', lambda: _layer(stride=3), ValueError, r'stride must be 1 or 2, got 3'),
    Case('layer: stride 2.0', lambda: _layer(stride=2.0), TypeError, r'stride must be 1 or 2 \(an int\), got 2\.0'),
    Case('layer: dim_out 0', lambda: _layer(dim_out=0), ValueError, r'dim_out must be an integer >= 1, got 0'),
    Case('layer: dim_out -3', lambda: _layer(dim_out=-3), ValueError, r'dim_out must be an integer >= 1, got -3'),
    Case('layer: value_ratio nan', lambda: _layer(value_ratio=float('nan')), ValueError,
         r'value_ratio must be a finite number > 0, got nan'),
    Case('layer: value_ratio inf', lambda: _layer(value_ratio=float('inf')), ValueError, r'value_ratio .* got inf'),
    Case("layer: value_ratio '1'", lambda: _layer(value_ratio='1'), TypeError,
         r"value_ratio must be a finite number > 0, got '1' of type str"),
    Case('layer: unknown attn_impl', lambda: _layer(attn_impl='flash'), ValueError,
         r"unknown attn_impl 'flash'; choose one of auto, fused, tiled, sdpa, broadcast"),
    Case('layer: tiled on the meta device', _no_grad(lambda: _layer(attn_impl='tiled', device='meta')(
        torch.randn(1, 16, 8, 8, device='meta'))), RuntimeError, r"attn_impl='tiled' runs on cpu only, got a meta"),
    Case('layer: fused on the meta device', _no_grad(lambda: _layer(attn_impl='fused', device='meta')(
        torch.randn(1, 16, 8, 8, device='meta'))), RuntimeError, r"attn_impl='fused' runs on cpu only, got a meta"),
    Case('layer: block not divisible by stride', lambda: _layer(block_size=3, stride=2), ValueError,
         r'block_size \(3\) must be divisible by stride \(2\)'),
    Case('layer: block_size 0', lambda: _layer(block_size=0), ValueError, r'block_size must be an integer >= 1'),
    Case('layer: negative halo', lambda: _layer(halo_size=-1), ValueError, r'halo_size must be an integer >= 0'),
    Case('layer: non-integer size', lambda: _layer(block_size=4.0), TypeError, r'block_size .* got 4\.0 of type float'),
    Case('layer: heads 0', lambda: _layer(heads=0), ValueError, r'heads must be an integer >= 1'),
    Case('layer: value_ratio leaves no channels', lambda: _layer(dim_head=2, value_ratio=0.1), ValueError,
         r'leaves no value channels'),
    # -- HaloNet models: input tensor
    Case('model: 3-D (unbatched) image', _no_grad(lambda: _model()(torch.randn(3, 32, 32))), ValueError,
         r'HaloNet expects a 4-D NCHW tensor, got 3-D'),
    Case('model: wrong channel count', _no_grad(lambda: _model()(torch.randn(1, 4, 32, 32))), ValueError,
         r'HaloNet was built for 3 input channels, got 4'),
    Case('model: float64 image', _no_grad(lambda: _model()(torch.randn(1, 3, 32, 32).double())), TypeError,
         r'HaloNet got a torch\.float64 input but its parameters are torch\.float32'),
    Case('model: uint8 image', _no_grad(lambda: _model()(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))),
         TypeError, r'floating point input, got torch\.uint8'),
    Case('model: forward_intermediates, float64',
         _no_grad(lambda: _model().forward_intermediates(torch.randn(1, 3, 32, 32).double())), TypeError,
         r'torch\.float64 input'),
    Case('model: empty batch (B = 0)', _no_grad(lambda: _model()(torch.randn(0, 3, 32, 32))),
         check=_check_shape(0, 5)),
    Case('model: 1x1 image', _no_grad(lambda: _model()(torch.randn(2, 3, 1, 1))),
         check=_check_shape(2, 5)),
    Case('model: NaN pixel', _model_nan, check=_check_model_nan),
    # -- HaloNet models: feature levels (0 = the stem at reduction 2, 1-4 = the stages, as timm's ResNet)
    Case('model: features_only, out_indices too large',
         lambda: _model(features_only=True, out_indices=(1, 5)), ValueError,
         r'out_indices \(1, 5\) out of range: this HaloNet has 5 feature levels, the stem \(0, reduction 2\) '
         r'and 4 stages \(1 to 4\), so valid indices are 0 to 4 \(or -5 to -1\)'),
    Case('model: features_only, out_indices too negative', lambda: _model(features_only=True, out_indices=(-6,)),
         ValueError, r'out_indices \(-6,\) out of range'),
    Case('model: features_only, out_indices=6 (last n)', lambda: _model(features_only=True, out_indices=6),
         ValueError, r'out_indices=6 \(the last n levels\) must be 1 to 5'),
    Case('model: features_only, out_indices not ints', lambda: _model(features_only=True, out_indices=(1.0, 2)),
         TypeError, r'out_indices must be an int n \(the last n levels\) or a sequence of int levels, got \(1\.0, 2\)'),
    Case('model: features_only, out_indices of a 2-stage model',
         lambda: _model(features_only=True, depths=(1, 1), widths=(16, 32), out_indices=(3,)), ValueError,
         r'3 feature levels, the stem \(0, reduction 2\) and 2 stages \(1 to 2\), so valid indices are 0 to 2'),
    Case('model: features_only, out_indices (2, 3, 4) are strides 8, 16, 32',
         lambda: _model(features_only=True, out_indices=(2, 3, 4)).feature_info.reduction(),
         check=_check_equal([8, 16, 32])),
    Case('model: forward_intermediates, index out of range',
         lambda: _model().forward_intermediates(torch.randn(1, 3, 32, 32), indices=[5]), ValueError,
         r'indices \(5,\) out of range: this HaloNet has 5 feature levels'),
    Case('model: forward_intermediates, last n out of range',
         lambda: _model().forward_intermediates(torch.randn(1, 3, 32, 32), indices=0), ValueError,
         r'indices=0 \(the last n levels\) must be 1 to 5'),
    Case('model: prune_intermediate_layers, index out of range', lambda: _model().prune_intermediate_layers([-6]),
         ValueError, r'indices \(-6,\) out of range'),
    # -- HaloNet models: construction (model kwargs are checked before any layer is built)
    Case('model: depths empty', lambda: _model(depths=(), widths=()), ValueError,
         r'depths must name at least one stage, e.g\. depths=\(3, 3, 10, 3\); got \(\)'),
    Case('model: depths empty, features_only', lambda: _model(depths=(), widths=(), features_only=True),
         ValueError, r'depths must name at least one stage'),
    Case('model: depths empty, features_only with out_indices',
         lambda: _model(depths=(), widths=(), features_only=True, out_indices=(0,)), ValueError,
         r'depths must name at least one stage'),
    Case('model: negative depth', lambda: _model(depths=(-1, 1, 1, 1)), ValueError,
         r'depths\[0\] of \(-1, 1, 1, 1\) must be an integer >= 1 .*got -1'),
    Case('model: zero depth', lambda: _model(depths=(1, 0, 1, 1)), ValueError,
         r'depths\[1\] .* must be an integer >= 1 \(.*a stage cannot be empty: to drop a stage, remove its entry '
         r'from both depths and widths\), got 0'),
    Case('model: depths not a sequence', lambda: _model(depths=4), TypeError,
         r'depths must be a sequence with one integer per stage, e\.g\. depths=\(3, 3, 10, 3\); got 4'),
    Case('model: non-integer depth', lambda: _model(depths=(1, 1.5, 1, 1)), TypeError,
         r'depths\[1\] .* must be an integer >= 1 .*got 1\.5 of type float'),
    Case('model: width 0', lambda: _model(widths=(16, 0, 64, 64)), ValueError,
         r'widths\[1\] of \(16, 0, 64, 64\) must be an integer >= 1 .*got 0'),
    Case('model: negative width', lambda: _model(widths=(-16, 32, 64, 64)), ValueError,
         r'widths\[0\] .* must be an integer >= 1 .*got -16'),
    Case('model: width not divisible by heads', lambda: _model(heads=3), ValueError,
         r'widths\[0\]=16 is not divisible by heads=3 .*use widths that are multiples of 3'),
    Case('model: out_ratio 0', lambda: _model(out_ratio=0), ValueError,
         r'out_ratio must be a finite number > 0 \(the paper\'s rb, e\.g\. 1\.0.*got 0$'),
    Case('model: negative out_ratio', lambda: _model(out_ratio=-1.0), ValueError, r'out_ratio .* got -1\.0'),
    Case('model: out_ratio nan', lambda: _model(out_ratio=float('nan')), ValueError,
         r'out_ratio must be a finite number > 0 .*got nan'),
    Case('model: out_ratio leaves no channels', lambda: _model(out_ratio=0.01), ValueError,
         r'out_ratio=0\.01 leaves stage 0 \(width 16\) with round\(16 \* 0\.01\) = 0 output channels; '
         r'use out_ratio >= 0\.0625'),
    Case('model: value_ratio nan', lambda: _model(value_ratio=float('nan')), ValueError,
         r'value_ratio must be a finite number > 0 \(the paper\'s rv, e\.g\. 1\.0.*got nan'),
    Case('model: value_ratio inf', lambda: _model(value_ratio=float('inf')), ValueError, r'value_ratio .* got inf'),
    Case('model: value_ratio not a number', lambda: _model(value_ratio='2'), TypeError,
         r"value_ratio must be a finite number > 0 .*got '2' of type str"),
    Case('model: value_ratio leaves no value channels', lambda: _model(value_ratio=0.1), ValueError,
         r'value_ratio=0\.1 leaves stage 0 \(width 16, 8 heads of 2 channels\) with no value channels per head; '
         r'use value_ratio >= 0\.5'),
    Case('model: negative num_features', lambda: _model(num_features=-1), ValueError,
         r'num_features must be an integer >= 0 \(width of the final 1x1 conv; 0 for none\), got -1'),
    Case('model: heads 0', lambda: _model(heads=0), ValueError,
         r'heads must be an integer >= 1 \(attention heads per block\), got 0'),
    Case('model: stem_chs 0', lambda: _model(stem_chs=0), ValueError,
         r'stem_chs must be an integer >= 1 \(stem conv width\), got 0'),
    Case('model: block_size 0', lambda: _model(block_size=0), ValueError,
         r'HaloNet: block_size must be an integer >= 1 .*got 0'),
    Case('model: odd block_size', lambda: _model(block_size=5), ValueError,
         r'HaloNet: block_size must be even, got 5: stages 2-4 downsample with stride-2 attention.*block_size=6'),
    Case('model: odd block_size, one stage (no stride-2 stage)',
         lambda: _model(block_size=5, depths=(1,), widths=(16,)).stages[0].blocks[0].attn.block_size,
         check=_check_equal(5)),
    Case('model: negative halo_size', lambda: _model(halo_size=-1), ValueError,
         r'HaloNet: halo_size must be an integer >= 0 \(halo h; 0 for none\), got -1'),
    Case('model: float block_size', lambda: _model(block_size=4.0), TypeError,
         r'HaloNet: block_size must be an integer >= 1 .*got 4\.0 of type float'),
    Case('model: in_chans 0', lambda: _model(in_chans=0), ValueError, r'in_chans must be an integer >= 1'),
    Case('model: negative num_classes', lambda: _model(num_classes=-1), ValueError,
         r'num_classes must be an integer >= 0 \(0 for no classifier\), got -1'),
    Case('model: misspelt kwarg', lambda: _model(halo_sise=2), TypeError, r"unexpected keyword argument 'halo_sise'"),
    Case('model: unknown name', lambda: timm.create_model('halonet_h9'), RuntimeError, r'halonet_h9'),
    Case('model: depths and widths differ in length', lambda: _model(depths=(1, 1), widths=(8, 16, 32)),
         ValueError, r'same length'),
    Case('model: intermediates in NHWC', lambda: _model().forward_intermediates(torch.randn(1, 3, 32, 32),
                                                                                 output_fmt='NHWC'),
         ValueError, r'NCHW only'),
]


@pytest.mark.parametrize('case', CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case):
    assert (case.error is None) != (case.check is None), 'a case gives either an error or a check'
    if case.error is not None:
        with pytest.raises(case.error, match=case.match) as info:
            case.run()
        assert info.type is case.error  # not a subclass (e.g. no AssertionError posing as something else)
    else:
        case.check(case.run())
