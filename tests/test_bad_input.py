"""Catalogue of bad and edge-case inputs: each row says what happens, an exception (type and message) or a result.

To add a case, append a `Case` to `CASES`: `run` performs the action; give `error` and `match` (a regex searched
in the message) for a failure, or `check` (called with what `run` returned) for a success. README's "Behaviour on
bad input" lists the same cases.
"""
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
import timm
import torch

import timm_halo  # noqa: F401  (registers the halonet_* models with timm)
from timm_halo import HaloAttention


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


def _nan_pixel(stride: int, block: int, halo: int, py: int, px: int) -> Callable[[], Any]:
    def run():
        torch.manual_seed(0)
        layer = HaloAttention(16, block_size=block, halo_size=halo, heads=2, dim_head=8, stride=stride,
                              dim_out=24).eval()  # with an output projection: it mixes channels, not pixels
        x = torch.randn(2, 16, 13, 11)
        poisoned = x.clone()
        poisoned[1, 3, py, px] = float('nan')
        with torch.no_grad():
            return layer(x), layer(poisoned), _expected_nan_outputs(layer, 13, 11, py, px)
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
    # -- HaloAttention: construction
    Case('layer: stride 3', lambda: _layer(stride=3), ValueError, r'stride must be 1 or 2, got 3'),
    Case('layer: block not divisible by stride', lambda: _layer(block_size=3, stride=2), ValueError,
         r'block_size \(3\) must be divisible by stride \(2\)'),
    Case('layer: block_size 0', lambda: _layer(block_size=0), ValueError, r'block_size must be an integer >= 1'),
    Case('layer: negative halo', lambda: _layer(halo_size=-1), ValueError, r'halo_size must be an integer >= 0'),
    Case('layer: non-integer size', lambda: _layer(block_size=4.0), ValueError, r'block_size .* got 4\.0'),
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
    # -- HaloNet models: construction
    Case('model: features_only, out_indices too large',
         lambda: _model(features_only=True, out_indices=(1, 4)), ValueError,
         r'out_indices \(1, 4\) out of range: this HaloNet has 4 stages, so valid indices are 0 to 3'),
    Case('model: features_only, out_indices too negative', lambda: _model(features_only=True, out_indices=(-5,)),
         ValueError, r'out of range'),
    Case('model: features_only, out_indices=5 (last n)', lambda: _model(features_only=True, out_indices=5),
         ValueError, r'out_indices=5 \(the last n stages\) must be 1 to 4'),
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


def test_catalogue_is_in_readme():
    """README's table and this catalogue describe the same behaviour."""
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
    section = readme.split('## Behaviour on bad input', 1)[1].split('\n## ', 1)[0]
    for phrase in ('4-D NCHW', 'input channels', 'parameters are', 'floating point', 'non-empty', 'B = 0',
                   '1x1', 'NaN', 'stride', 'out_indices', 'keyword', 'halo larger than the block'):
        assert phrase in section, phrase
