"""ONNX and ``torch.export`` of HaloNets and ``HaloAttention``, checked against eager PyTorch (docs/deployment.md)."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.export import Dim

from timm_halo.layers import HaloAttention
from timm_halo.models.halonet import HaloBottleneck

# Max abs difference allowed between ONNX Runtime and eager PyTorch in fp32 (typical diffs 1e-7 to 1e-5)
ONNX_ATOL = 1e-4
# torch 2.6's torch.export (ONNX export too) fails on these models' dynamic block counts; 2.11 and later are tested.
EXPORT_MIN_TORCH = '2.7'


class ExportParityError(RuntimeError):
    """An exported graph disagrees with the eager module by more than the tolerance."""


@dataclass
class ParityReport:
    """Outcome of a parity check: the worst max abs difference over every checked input and output."""

    path: Optional[Path]
    max_abs_diff: float
    atol: float
    input_shapes: List[Tuple[int, ...]] = field(default_factory=list)
    max_abs_output: float = 0.0  # scale of the reference outputs, to read the diff against

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.atol  # False for NaN

    def __str__(self) -> str:
        shapes = ', '.join('x'.join(map(str, s)) for s in self.input_shapes)
        return (f"parity {'OK' if self.ok else 'FAILED'}: max |diff| {self.max_abs_diff:.3g} (atol {self.atol:g}; "
                f'outputs up to {self.max_abs_output:.3g}) over inputs {shapes}')


def example_input(model: nn.Module, img_size: Optional[int] = None, batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    """A seeded standard-normal NCHW input for ``model``, at its default size unless ``img_size`` is given."""
    # a HaloAttention's: a map that is not a multiple of its block size, so that padding and masking are checked
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if isinstance(model, HaloAttention):
        channels, size = model.dim, 2 * model.block_size + 3
    elif 'input_size' in cfg:
        channels, size = int(getattr(model, 'in_chans', cfg['input_size'][0])), int(cfg['input_size'][-1])
    else:
        raise ValueError(f'cannot tell the input size of a {type(model).__name__}: pass an example input explicitly')
    size = img_size or size
    return torch.randn(batch_size, channels, size, size, generator=torch.Generator().manual_seed(seed))


def wake_residual_branches(model: nn.Module, gain: float = 0.2, seed: int = 0) -> nn.Module:
    """``model`` with small random residual-branch gains (``gain`` x U[0.5, 1.5]) where timm puts zeros."""
    # an untrained HaloNet's zero-initialised last BatchNorms would hide every attention layer from a parity check
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HaloBottleneck):
                m.conv3.bn.weight.copy_((torch.rand(m.conv3.bn.weight.shape, generator=g) + 0.5) * gain)
    return model


def _dynamic_shapes(dynamic_batch: bool, dynamic_size: bool) -> Optional[Tuple[dict]]:
    """torch.export's ``dynamic_shapes`` for these axes; RuntimeError where this torch cannot export."""
    if torch.__version__ < EXPORT_MIN_TORCH:
        raise RuntimeError(f'exporting HaloNet models needs torch >= {EXPORT_MIN_TORCH}, this is {torch.__version__}: '
                           'its torch.export cannot handle the dynamic shapes of the block counts (ceil(H / '
                           'block_size)). torch.compile and TorchScript work on this torch; upgrade torch to export.')
    dims = {0: Dim('batch', min=1)} if dynamic_batch else {}
    if dynamic_size:
        dims[2], dims[3] = Dim('height', min=1), Dim('width', min=1)
    return (dims,) if dims else None  # positional form: works whatever forward() calls its argument


def _flat_outputs(out: Any) -> List[torch.Tensor]:
    """Model outputs as a flat list (timm's features_only models return a list of maps)."""
    if not isinstance(out, (list, tuple, torch.Tensor)):
        raise TypeError(f'cannot compare an output of type {type(out).__name__}')
    return [t for o in out for t in _flat_outputs(o)] if isinstance(out, (list, tuple)) else [out]


def _max_abs_diff(expected: Sequence[torch.Tensor], got: Sequence[Any]) -> float:
    """Worst max abs difference; inf on a shape mismatch or where only one side is NaN (both NaN counts as 0)."""
    worst = 0.0 if len(expected) == len(got) else float('inf')
    for e, g in zip(expected, got):
        e, g = e.detach().float().cpu(), torch.as_tensor(g).detach().float().cpu()
        if e.shape != g.shape:
            return float('inf')
        if e.numel():
            diff = torch.where(e.isnan() & g.isnan(), 0.0, (e - g).abs())
            worst = max(worst, float(diff.nan_to_num(nan=float('inf')).max()))
    return worst


def _parity(run: Callable[[torch.Tensor], Sequence[Any]], model: nn.Module, inputs: Sequence[torch.Tensor],
            atol: float, path: Optional[Path]) -> ParityReport:
    """Run ``run`` (the exported graph) and the eager ``model`` on each input; report the worst max abs diff."""
    worst = scale = 0.0
    for x in inputs:
        with torch.no_grad():
            expected = _flat_outputs(model(x))
        worst = max(worst, _max_abs_diff(expected, run(x)))
        scale = max([scale] + [float(t.abs().nan_to_num().max()) for t in expected if t.numel()])
    return ParityReport(path, worst, atol, [tuple(x.shape) for x in inputs], scale)


def export_program(model: nn.Module, example: torch.Tensor, dynamic_batch: bool = True, dynamic_size: bool = False
                   ) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` (put in eval mode) for inputs like ``example``; dynamic batch."""
    if dynamic_size:  # docs/deployment.md: torch.export cannot prove the bounds of ceil(H / block_size)
        raise ValueError('torch.export with a dynamic height/width is not supported for HaloAttention models (the '
                         'block count ceil(H / block_size) is not provable for a symbolic H): export one program per '
                         'input size, or use export_onnx(..., dynamic_size=True).')
    return torch.export.export(model.eval(), (example,), dynamic_shapes=_dynamic_shapes(dynamic_batch, False))


def program_parity(program: torch.export.ExportedProgram, model: nn.Module, inputs: Sequence[torch.Tensor],
                   atol: float = 1e-5) -> ParityReport:
    """Run the exported program and the eager ``model`` on each input; report the worst max abs difference."""
    module = program.module()
    return _parity(lambda x: _flat_outputs(module(x)), model, inputs, atol, None)


def export_onnx(model: nn.Module, path: Union[str, Path], example: torch.Tensor, dynamic_batch: bool = True,
                dynamic_size: bool = False, opset_version: Optional[int] = None) -> Path:
    """``model`` (put in eval mode) as one self-contained ONNX file (``dynamo=True``); names: docs/deployment.md."""
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes - {torch.float32}:
        raise ValueError(f'export and its parity check work in fp32, but the model has {sorted(map(str, dtypes))} '
                         'parameters: export model.float() (and convert the ONNX file to fp16 afterwards if needed)')
    dynamic_shapes, path = _dynamic_shapes(dynamic_batch, dynamic_size), Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        n = len(_flat_outputs(model.eval()(example)))
        torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=['input'],
                          output_names=['output'] if n == 1 else [f'output_{i}' for i in range(n)],
                          dynamic_shapes=dynamic_shapes, opset_version=opset_version, external_data=False,
                          verbose=False)  # external_data=False: fine below ONNX's 2 GB limit (H7: ~270 MB)
    import onnx

    proto = onnx.load(str(path))
    _check_dynamic_axes(proto, path, {0: 'batch'} if dynamic_batch else {},
                        {2: 'height', 3: 'width'} if dynamic_size else {})
    if dynamic_size:
        # Symbolic sizes in the intermediate shapes can name two different sizes alike, and ONNX Runtime then warns
        # ('Shape mismatch attempting to re-use buffer'); it infers the shapes itself.
        del proto.graph.value_info[:]
        onnx.save(proto, str(path))
    return path


def _check_dynamic_axes(proto: Any, path: Path, *requested: dict) -> None:
    """RuntimeError (and no file) where the exporter fixed an axis that was asked to be dynamic."""
    # torch.onnx.export falls back to the example's sizes when the model branches on a dynamic size (e.g. whether
    # the batch is 1): the file would then reject every other size.
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    fixed = {name: dims[axis].dim_value for axes in requested for axis, name in axes.items()
             if axis < len(dims) and not dims[axis].dim_param}
    if fixed:
        path.unlink()
        raise RuntimeError(
            'the ONNX exporter fixed dynamic input axes to the example\'s sizes ('
            f'{", ".join(f"{k} = {v}" for k, v in fixed.items())}): the model asks about that size while it is '
            'traced (e.g. whether the batch is 1). Export with another example size (a batch of 2), or without the '
            'dynamic axis.')


def _ort_outputs(session: Any, x: torch.Tensor) -> List[Any]:
    return session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})


def onnx_parity(path: Union[str, Path], model: nn.Module, inputs: Sequence[torch.Tensor], atol: float = ONNX_ATOL
                ) -> ParityReport:
    """Run the ONNX file in ONNX Runtime (CPU) and the eager ``model`` on each input; report the worst diff."""
    import onnxruntime as ort  # the test extra (docs/deployment.md)

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    return _parity(lambda x: _ort_outputs(session, x), model.eval(), inputs, atol, Path(path))


def parity_inputs(model: nn.Module, example: torch.Tensor, dynamic_batch: bool, dynamic_size: bool
                  ) -> List[torch.Tensor]:
    """The export example plus, per dynamic axis, an input that differs from it there (new values too)."""
    (batch, channels, height, width), generator = example.shape, torch.Generator().manual_seed(1)
    inputs = [example] + ([torch.randn(batch + 1, channels, height, width, generator=generator)] if dynamic_batch
                          else [])
    if dynamic_size:  # smaller and not a multiple of anything: other block counts, padding and border masks
        inputs.append(torch.randn(1, channels, height * 2 // 3 + 1, width // 2 + 3, generator=generator))
    return inputs


def export_onnx_checked(model: nn.Module, path: Union[str, Path], example: Optional[torch.Tensor] = None,
                        dynamic_batch: bool = True, dynamic_size: bool = False, atol: float = ONNX_ATOL,
                        opset_version: Optional[int] = None) -> ParityReport:
    """Export to ONNX and check it in ONNX Runtime against eager PyTorch; ``ExportParityError`` beyond ``atol``."""
    example = example_input(model) if example is None else example
    export_onnx(model, path, example, dynamic_batch, dynamic_size, opset_version)
    report = onnx_parity(path, model, parity_inputs(model, example, dynamic_batch, dynamic_size), atol)
    if not report.ok:
        raise ExportParityError(f'{path}: ONNX Runtime disagrees with PyTorch: {report}')
    return report
