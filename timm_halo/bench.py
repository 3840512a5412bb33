"""Model throughput: interleaved median timing, GMACs per image and img/s.

Shared by ``timm-halo bench`` and ``benchmarks/model.py`` / ``benchmarks/resolution.py`` (the ``benchmarks``
folder is not packaged, so the measuring code lives here).
"""
import argparse
import contextlib
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F

from timm_halo.summary import count_gmacs

# A fwd+bwd step costs about three forwards: the backward computes gradients w.r.t. both inputs and weights.
TRAIN_MACS_FACTOR = 3.0
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def interleaved_medians(
        fns: Dict[str, Callable[[], object]],
        device: torch.device,
        repeats: int = 7,
        warmup: int = 2,
) -> Dict[str, float]:
    """Median seconds per call of each fn, calling them round-robin so drift hits every contender alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


@dataclass(frozen=True)
class ModelSpec:
    """One contender: a label, a zero-argument factory (it builds on the current default device) and an input size."""
    label: str
    factory: Callable[[], torch.nn.Module]
    img_size: int


@dataclass
class ModelResult:
    label: str
    img_size: int
    batch_size: int
    train: bool
    seconds: float  # median seconds per step (one batch)
    gmacs: float  # forward GMACs of one image

    @property
    def img_per_s(self) -> float:
        return self.batch_size / self.seconds

    @property
    def step_gmacs(self) -> float:
        """GMACs per image of the timed step (a train step counts as TRAIN_MACS_FACTOR forwards)."""
        return self.gmacs * (TRAIN_MACS_FACTOR if self.train else 1.0)

    @property
    def gmac_per_s(self) -> float:
        return self.step_gmacs * self.img_per_s

    def as_dict(self) -> Dict[str, Any]:
        return dict(asdict(self), mode=self.mode, img_per_s=self.img_per_s, gmac_per_s=self.gmac_per_s)

    @property
    def mode(self) -> str:
        return 'train' if self.train else 'infer'


def timm_spec(name: str, img_size: Optional[int] = None, label: Optional[str] = None) -> ModelSpec:
    """A ``timm.create_model(name)`` contender, at the model's own input size unless one is given."""
    if img_size is None:
        cfg = timm.get_pretrained_cfg(name)
        img_size = cfg.input_size[-1] if cfg is not None else 224
    return ModelSpec(label or name, partial(timm.create_model, name), img_size)


def model_gmacs(factory: Callable[[], torch.nn.Module], img_size: int) -> float:
    """Forward GMACs of one image, counted on a meta-device copy (no weights allocated, nothing computed)."""
    with torch.device('meta'):
        model = factory()
    return count_gmacs(model.eval(), img_size)


def default_device() -> torch.device:
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def default_batch_size(device: torch.device) -> int:
    # Small on CPU so a whole benchmark stays within minutes on a 2-core machine.
    return 8 if device.type == 'cuda' else 2


def default_repeats(device: torch.device) -> int:
    return 20 if device.type == 'cuda' else 5


def device_description(device: torch.device) -> str:
    if device.type == 'cuda':
        return f'cuda ({torch.cuda.get_device_name(device)})'
    return f'{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)'


def amp_dtype_for(device: torch.device, amp: Optional[str]) -> Optional[torch.dtype]:
    """The autocast dtype for ``--amp`` (None: off). fp16 autocast is only offered on CUDA."""
    if amp is None:
        return None
    if amp not in AMP_DTYPES:
        raise ValueError(f'amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}')
    if amp == 'fp16' and device.type != 'cuda':
        raise ValueError('fp16 autocast is only supported on CUDA here; use bf16 on CPU')
    return AMP_DTYPES[amp]


def _infer_step(model: torch.nn.Module, x: torch.Tensor, autocast: Callable[[], Any]) -> None:
    with torch.no_grad(), autocast():
        model(x)


def _train_step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, autocast: Callable[[], Any]) -> None:
    # fwd + loss + bwd; no optimizer step, so the figure is the network's cost alone. No loss scaling with
    # fp16: underflowing gradients cost the same time.
    model.zero_grad(set_to_none=True)
    with autocast():
        out = model(x)
    F.cross_entropy(out.float(), target).backward()


def _key(spec: ModelSpec) -> str:
    return f'{spec.label} @{spec.img_size}'


def measure_models(
        specs: Sequence[ModelSpec],
        device: torch.device,
        batch_size: int,
        train: bool = False,
        repeats: int = 3,
        warmup: int = 1,
        amp_dtype: Optional[torch.dtype] = None,
        compiled: bool = False,
        channels_last: bool = False,
) -> List[ModelResult]:
    """Median seconds per step of every contender, timed round-robin in this process; plus GMACs and img/s.

    All models are built first and stay in memory, so that each timing round visits every contender.
    """
    if compiled:
        warmup = max(warmup, 1)  # the first call compiles
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    autocast = partial(torch.autocast, device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext
    fns: Dict[str, Callable[[], None]] = {}
    gmacs: Dict[str, float] = {}
    for spec in specs:
        key = _key(spec)
        if key in fns:
            raise ValueError(f'duplicate contender {key!r}')
        gmacs[key] = model_gmacs(spec.factory, spec.img_size)
        torch.manual_seed(0)
        model = spec.factory().to(device=device, memory_format=memory_format).train(train)
        x = torch.randn(batch_size, 3, spec.img_size, spec.img_size, device=device)
        x = x.contiguous(memory_format=memory_format)
        if compiled:
            model = torch.compile(model)
        if train:
            target = torch.randint(0, 10, (batch_size,), device=device)
            fns[key] = partial(_train_step, model, x, target, autocast)
        else:
            fns[key] = partial(_infer_step, model, x, autocast)
    seconds = interleaved_medians(fns, device, repeats=repeats, warmup=warmup)
    return [ModelResult(s.label, s.img_size, batch_size, train, seconds[_key(s)], gmacs[_key(s)]) for s in specs]


def format_table(results: Sequence[ModelResult]) -> str:
    """Markdown table: one row per contender and mode."""
    lines = ['| model | input | batch | mode | ms/step | img/s | GMACs/img | GMAC/s |',
             '|---|---|---|---|---|---|---|---|']
    for r in results:
        lines.append(f'| {r.label} | {r.img_size} | {r.batch_size} | {r.mode} | {r.seconds * 1e3:.1f} '
                     f'| {r.img_per_s:.2f} | {r.gmacs:.2f} | {r.gmac_per_s:.1f} |')
    return '\n'.join(lines)


def run_header(device: torch.device, what: str, amp: Optional[str] = None, compiled: bool = False,
               channels_last: bool = False) -> str:
    flags = [f'amp {amp}' if amp else 'fp32', 'compiled' if compiled else 'eager']
    if channels_last:
        flags.append('channels-last')
    return (f'{what} | device {device_description(device)} | torch {torch.__version__} | timm {timm.__version__} '
            f'| {", ".join(flags)} | medians of interleaved runs | train GMAC/s counts fwd+bwd as '
            f'{TRAIN_MACS_FACTOR:g}x the forward')


# -- `timm-halo bench` -------------------------------------------------------------------------------------------

def resolve_device_and_amp(
        args: argparse.Namespace, parser: argparse.ArgumentParser,
) -> Tuple[torch.device, Optional[torch.dtype]]:
    """The run's device (``--device``, else cuda if present) and autocast dtype (``--amp``); parser errors if
    the machine can't do what was asked. Shared by ``timm-halo bench`` and the benchmark scripts."""
    device = torch.device(args.device) if args.device else default_device()
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is available')
    try:
        return device, amp_dtype_for(device, args.amp)
    except ValueError as e:
        parser.error(str(e))


def _cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not timm.is_model(args.model):
        parser.error(f'unknown model {args.model!r}')
    device, amp_dtype = resolve_device_and_amp(args, parser)
    batch_size = args.batch_size or default_batch_size(device)
    repeats = args.repeats or default_repeats(device)
    if batch_size < 1 or repeats < 1 or (args.img_size is not None and args.img_size < 32):
        parser.error('--batch-size and --repeats must be >= 1 and --img-size >= 32')
    spec = timm_spec(args.model, args.img_size)
    results = []
    for train in (False, True) if args.train else (False,):
        results += measure_models([spec], device, batch_size, train=train, repeats=repeats, warmup=args.warmup,
                                  amp_dtype=amp_dtype, compiled=args.compile, channels_last=args.channels_last)
    print(run_header(device, f'timm-halo bench {args.model}', args.amp, args.compile, args.channels_last))
    print(format_table(results))
    return 0


def add_cli_commands(subparsers: Any) -> None:
    """Add ``bench`` to the ``timm-halo`` command; it sets ``handler``."""
    bench = subparsers.add_parser(
        'bench', help='measure a model\'s inference (and train step) img/s, GMACs and GMAC/s on this machine',
        description='Time a timm model on the available device (cuda if there is one, else cpu): median of '
                    'repeated steps, img/s, GMACs per image and achieved GMAC/s. For peers and ratios run '
                    'python -m benchmarks.model from a source checkout.')
    bench.add_argument('--model', default='halonet_h1', help='any timm model name (default: halonet_h1)')
    bench.add_argument('--img-size', type=int, default=None, help='input size (default: the model\'s own)')
    bench.add_argument('--batch-size', type=int, default=None, help='default: 8 on cuda, 2 on cpu')
    bench.add_argument('--train', action='store_true', help='also time a train step (fwd+bwd)')
    bench.add_argument('--repeats', type=int, default=None, help='timed steps (default: 20 on cuda, 5 on cpu)')
    bench.add_argument('--warmup', type=int, default=1, help='untimed steps first (default: 1)')
    bench.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    bench.add_argument('--amp', nargs='?', const='bf16', choices=sorted(AMP_DTYPES), default=None,
                       help='autocast (bf16 by default; fp16 on cuda only)')
    bench.add_argument('--channels-last', action='store_true')
    bench.add_argument('--compile', action='store_true', help='torch.compile the model (slow to start on cpu)')
    bench.set_defaults(handler=_cmd_bench)
