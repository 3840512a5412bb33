"""The harness of ``timm-halo bench`` and ``benchmarks/``: GMACs, interleaved timings, memory, options, tables."""
import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from timm_halo.models.halonet import FAMILY

# A fwd+bwd step costs about three forwards: the backward computes gradients w.r.t. both inputs and weights.
TRAIN_MACS_FACTOR = 3.0
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def count_gmacs(model: torch.nn.Module, img_size: int, in_chans: int = 3) -> float:
    """Multiply-accumulates (1e9) of one forward at ``img_size``; the model may live on the meta device."""
    x = torch.empty(1, in_chans, img_size, img_size, device=next(model.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2e9


def model_gmacs(factory: Callable[[], torch.nn.Module], img_size: int) -> float:
    """Forward GMACs of one image, counted on a meta-device copy (no weights allocated, nothing computed)."""
    with torch.device('meta'):
        return count_gmacs(factory().eval(), img_size)


def summarize(name: str, img_size: Optional[int] = None) -> Dict[str, Any]:
    """Params (measured on the meta device) and GMACs of one of the family, against the paper's table."""
    model = timm.create_model(name, device='meta')
    size = img_size or model.pretrained_cfg['input_size'][-1]
    params_m, paper = sum(p.numel() for p in model.parameters()) / 1e6, FAMILY[name]
    return dict(name=name, img_size=size, params_m=params_m, paper_params_m=paper['params_m'],
                params_diff_pct=100.0 * (params_m / paper['params_m'] - 1.0), gmacs=count_gmacs(model, size),
                paper_top1=paper['top1'])


def sync_timer() -> float:
    """A clock that waits for the GPU's queued work first."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def interleaved_medians(fns: Dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 2,
                        timer: Callable[[], float] = sync_timer, number: Optional[Dict[str, int]] = None
                        ) -> Dict[str, float]:
    """Median seconds per call of each fn (``number[name]`` calls a sample), round-robin: drift hits all alike."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            start, calls = timer(), (number or {}).get(name, 1)
            for _ in range(calls):
                fn()
            if round_ >= warmup:
                times[name].append((timer() - start) / calls)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak extra memory of one call, in bytes: the CUDA allocator's peak, or on CPU the peak RSS growth (Linux)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base

    def status_kib(key: str) -> int:
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ':'))

    gc.collect()
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # reset the peak resident set size to the current one
    base = status_kib('VmRSS')
    fn()
    return max(status_kib('VmHWM') - base, 0) * 1024


# glibc's malloc hands allocations above its mmap threshold fresh pages (page faults on every call) and gives a
# freed heap top back to the OS; these settings keep freed memory for reuse, as jemalloc / tcmalloc do. They change
# timm's halonet_h1 the most: 1.7x faster at batch 1, 2.6x at batch 8 (inference), 1.5x its train step; ours
# within 7% (benchmarks/RESULTS.md).
TUNED_MALLOC = {'MALLOC_MMAP_THRESHOLD_': str(2**32), 'MALLOC_TRIM_THRESHOLD_': str(2**32)}


def malloc_setting() -> str:
    """How this process's malloc was configured, for run headers (glibc reads these variables at start-up)."""
    tuned = {k: os.environ[k] for k in TUNED_MALLOC if k in os.environ}
    return ', '.join(f'{k}={v}' for k, v in tuned.items()) or 'glibc malloc defaults'


@contextlib.contextmanager
def busy_load(processes: int) -> Iterator[None]:
    """``processes`` busy-loop processes while the block runs (what a second job does to a shared machine)."""
    procs = [subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in range(processes)]
    try:
        time.sleep(0.5 if procs else 0)  # let the scheduler spread them
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def table(columns: list, rows: Sequence[dict]) -> str:
    """Markdown table; a column is a key, or (header, key, format string or function); a missing value shows '-'."""
    cols = [(c, c, '{}') if isinstance(c, str) else c for c in columns]

    def cell(value: Any, fmt: Any) -> str:
        return '-' if value is None else (fmt(value) if callable(fmt) else fmt.format(value)).replace('|', '/')

    return '\n'.join(['| ' + ' | '.join(c[0] for c in cols) + ' |', '|' + '---|' * len(cols)] +
                     ['| ' + ' | '.join(cell(r.get(key), fmt) for _, key, fmt in cols) + ' |' for r in rows])


# -- whole models ------------------------------------------------------------------------------------------------

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

    def __post_init__(self) -> None:  # vars(result): the fields and these, as the JSON rows hold them
        self.mode, self.img_per_s = 'train' if self.train else 'infer', self.batch_size / self.seconds
        # a train step counts as TRAIN_MACS_FACTOR forwards
        self.gmac_per_s = self.gmacs * (TRAIN_MACS_FACTOR if self.train else 1.0) * self.img_per_s


def timm_spec(name: str, img_size: Optional[int] = None) -> ModelSpec:
    """A ``timm.create_model(name)`` contender, at the model's own input size unless one is given."""
    cfg = timm.get_pretrained_cfg(name)
    return ModelSpec(name, partial(timm.create_model, name), img_size or (cfg.input_size[-1] if cfg else 224))


def _step(model: torch.nn.Module, x: torch.Tensor, target: Optional[torch.Tensor], autocast: Callable[[], Any]):
    with torch.set_grad_enabled(target is not None), autocast():
        out = model(x)
    if target is not None:  # a train step: fwd + loss + bwd; no optimizer step: the network's cost alone
        model.zero_grad(set_to_none=True)
        F.cross_entropy(out.float(), target).backward()


def measure_models(specs: Sequence[ModelSpec], device: torch.device, batch_size: int, train: bool = False,
                   repeats: int = 3, warmup: int = 1, amp_dtype: Optional[torch.dtype] = None, compiled: bool = False,
                   channels_last: bool = False) -> List[ModelResult]:
    """Median seconds per step of every contender (all built first, timed round-robin), with GMACs."""
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    autocast = partial(torch.autocast, device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext
    fns, gmacs = {}, {}  # by contender: its step, its GMACs
    for spec in specs:
        key = f'{spec.label} @{spec.img_size}'
        if key in fns:
            raise ValueError(f'duplicate contender {key!r}')
        gmacs[key] = model_gmacs(spec.factory, spec.img_size)
        torch.manual_seed(0)
        model = spec.factory().to(device=device, memory_format=memory_format).train(train)
        x = torch.randn(batch_size, 3, spec.img_size, spec.img_size, device=device).to(memory_format=memory_format)
        target = torch.randint(0, 10, (batch_size,), device=device) if train else None
        fns[key] = partial(_step, torch.compile(model) if compiled else model, x, target, autocast)
    seconds = interleaved_medians(fns, repeats=repeats, warmup=max(warmup, 1) if compiled else warmup)
    return [ModelResult(s.label, s.img_size, batch_size, train, seconds[k], gmacs[k]) for k, s in zip(fns, specs)]


def measure_modes(specs: Sequence[ModelSpec], args: argparse.Namespace, modes: Sequence[bool] = (False,)
                  ) -> List[ModelResult]:
    """``measure_models`` in each mode (train: True) with the options of ``add_run_args`` and ``resolve_run``."""
    with busy_load(args.load):
        return [r for train in modes for r in measure_models(specs, args.device, args.batch_size, train, args.repeats,
                                                             args.warmup, args.amp_dtype, args.compile,
                                                             args.channels_last)]


def format_table(results: Sequence[ModelResult]) -> str:
    """Markdown table: one row per contender and mode."""
    return table([('model', 'label', '{}'), ('input', 'img_size', '{}'), ('batch', 'batch_size', '{}'), 'mode',
                  ('ms/step', 'seconds', lambda s: f'{s * 1e3:.1f}'), ('img/s', 'img_per_s', '{:.2f}'),
                  ('GMACs/img', 'gmacs', '{:.2f}'), ('GMAC/s', 'gmac_per_s', '{:.1f}')], [vars(r) for r in results])


# -- what every run shares: options, device and AMP, header, JSON ----------------------------------------------

def add_run_args(parser: argparse.ArgumentParser, cpu_batch_size: Optional[int] = 2) -> None:
    """Device, repeats, threads, busy load, JSON output; given a CPU batch size, also the options of whole models."""
    add = parser.add_argument
    add('--device', default=None, help='default: cuda if available, else cpu')
    add('--repeats', type=int, default=None, help='timed rounds (default: 20 on cuda, 5 on cpu)')
    add('--threads', type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    add('--load', type=int, default=0, metavar='N', help='N busy-loop processes during the timings (a shared machine)')
    add('--json', metavar='PATH', help='also write the results as JSON (for benchmarks.plot)')
    if cpu_batch_size:
        add('--batch-size', type=int, default=argparse.SUPPRESS, help=f'default: 8 on cuda, {cpu_batch_size} on cpu')
        add('--warmup', type=int, default=1, help='untimed rounds first (default: 1)')
        add('--amp', nargs='?', const='bf16', choices=sorted(AMP_DTYPES), help='autocast: bf16 (default), fp16 (cuda)')
        add('--channels-last', action='store_true')
        add('--compile', action='store_true', help='torch.compile every model (slow on cpu)')
        parser.set_defaults(cpu_batch_size=cpu_batch_size)


def resolve_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fills ``add_run_args``' defaults in ``args`` (device a torch.device, ``amp_dtype``); sets the threads."""
    args.device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    on_cuda, args.amp_dtype = args.device.type == 'cuda', AMP_DTYPES.get(args.amp)
    if on_cuda and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is available')
    if args.amp == 'fp16' and not on_cuda:
        parser.error('--amp fp16 is only supported on CUDA here; use bf16 on CPU')
    args.batch_size = getattr(args, 'batch_size', None) or (8 if on_cuda else args.cpu_batch_size)
    args.repeats = args.repeats or (20 if on_cuda else 5)
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error('--batch-size, --repeats and --threads must be >= 1, --warmup >= 0')
    if args.threads:
        torch.set_num_threads(args.threads)
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores / 2:  # several threads that wait on each other can slow down by 10x when a neighbour is busy
        print(f'note: load average {load:.1f} on {cores} cores before starting: expect noisy figures' + (
            '' if torch.get_num_threads() == 1 else '; --threads 1 is steadier on a shared machine'), file=sys.stderr)


def device_name(device: torch.device) -> str:
    """'cuda (<GPU name>)' or 'cpu (<processor>, N threads)'."""
    return (f'cuda ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else
            f'{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)')


def run_header(what: str, args: argparse.Namespace) -> str:
    flags = [f'amp {args.amp}' if args.amp else 'fp32', 'compiled' if args.compile else 'eager', 'channels-last'
             if args.channels_last else '', f'{args.load} busy-loop process(es)' if args.load else 'quiet']
    return (f'{what}, batch {args.batch_size}, {args.repeats} repeats | device {device_name(args.device)} | torch '
            f'{torch.__version__} | timm {timm.__version__} | {", ".join(filter(None, flags))} | '
            f'{malloc_setting()} | medians of interleaved runs | train GMAC/s counts fwd+bwd as '
            f'{TRAIN_MACS_FACTOR:g}x the forward')


def write_json(data: Dict[str, Any], path: Optional[str]) -> None:
    if path:
        with open(path, 'w') as f:
            json.dump(data, f, indent=1, default=str)
        print(f'wrote {path}')
