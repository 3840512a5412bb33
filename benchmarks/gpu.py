"""The GPU check's benchmark sections: HaloAttention's CUDA path against timm, layer and whole model.

    python -m benchmarks.gpu [--section NAME[,NAME...]] [--device cuda|cpu] [--quick] [--out DIR] [--budget SECONDS]
    python -m benchmarks.gpu --summary [--out DIR]

``benchmarks/gpu_check.sh`` runs each section in its own process under its own time limit; without ``--section``
all run here, one after another. Each section rewrites ``<section>.md`` / ``<section>.json`` in the output folder
(``$OUT`` if set, else ``benchmarks/out/gpu``) at every row, so a run cut short keeps what it measured, and any
exception ends the section with its error recorded there (status ``failed``). ``--summary`` gathers the sections'
files into ``gpu.md`` / ``gpu.json`` with the performance goals.

- ``layer``: ours ('sdpa' with values padded for flash, 'sdpa narrow-v' with values at their own width,
  'broadcast') vs timm's ``HaloAttn`` at HaloNet-H1's four stage shapes (batch 64, block 8, halo 3, 8 heads of
  C/8), fp32 and bf16 autocast: forward (no grad), forward+backward (input gradient too), peak memory of one
  forward+backward above what was allocated before it (``torch.cuda.max_memory_allocated``).
- ``sdpa``: the q'/k'/v' that ``attn_impl='sdpa'`` hands to ``F.scaled_dot_product_attention`` at each stage shape,
  the backend SDPA picks by default, and which CUDA backends accept the call.
- ``models_eager``, ``models_compiled``: ours halonet_h1 vs timm's own halonet_h1 (``timm.models.byoanet``; the
  registry name is ours once timm_halo is imported) vs resnet50 at 256 px, bf16 autocast, channels-last, batch 128:
  inference and train step (forward + cross-entropy + backward, no optimizer step), eager or ``torch.compile``
  (train first: it matters most). GMACs per image are counted on a meta-device copy (ours counts the maths of its
  plain path); GMAC/s = GMACs per image x img/s (a train step counts as 3 forwards).

Timings: CUDA events around each sample (host clock on CPU), samples taken round-robin across contenders, medians.
``--quick`` is the dry run: stages 1 and 4 at a quarter of their size, one sample, models at batch 1 timed by
their first call, only ours compiled and only its train step, on CPU with the ``eager`` compile backend (dynamo's
tracing, no code generation).
``GPU_CHECK_FAIL=<section>[:error|crash|hang],...`` makes a section raise, die by SIGSEGV or hang at its first
row, to check that the failure is recorded and the rest runs.
"""
import argparse
import contextlib
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn.functional as F
from timm.layers.halo_attn import HaloAttn
from torch.nn.attention import SDPBackend
from torch.utils.flop_counter import FlopCounterMode

import timm_halo  # noqa: F401  (registers halonet_* with timm)
from timm_halo.layers import HaloAttention
from timm_halo.layers import sdpa as sdpa_module

SECTIONS = ('layer', 'sdpa', 'models_eager', 'models_compiled')  # gpu_check.sh runs 'tests' itself, first
# (channels, map size) of each stage, as HaloNet-H1 at 256 px; the batch comes from the command line
STAGES = {'stage1': (64, 64), 'stage2': (128, 32), 'stage3': (256, 16), 'stage4': (512, 8)}
BLOCK, HALO, HEADS = 8, 3, 8
LAYER_IMPLS = ('timm HaloAttn', 'ours sdpa', 'ours sdpa narrow-v', 'ours broadcast')
MODELS = ('ours halonet_h1', 'timm halonet_h1', 'resnet50')
TRAIN_MACS_FACTOR = 3.0  # backward: gradients w.r.t. inputs and weights, about two forwards
BACKEND_NAMES = {int(b): n for n, b in SDPBackend.__members__.items()}


# ---- timing ------------------------------------------------------------------------------------------------------

class Clock:
    """Wall-clock budget of one section (its process's time limit, less a margin)."""

    def __init__(self, budget_s: float):
        self.start, self.budget = time.monotonic(), budget_s

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _sample(fn: Callable[[], None], device: torch.device, number: int) -> float:
    """Seconds per call of ``number`` back-to-back calls."""
    if device.type == 'cuda':
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def interleaved_medians(fns: Dict[str, Callable[[], None]], device: torch.device, repeats: int, warmup: int,
                        min_sample_s: float) -> Dict[str, float]:
    """Median seconds per call of each function; samples taken round-robin so drift hits all alike. Each sample
    runs enough calls to last about ``min_sample_s`` (event timing of sub-millisecond calls is noisy)."""
    number = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        _sync(device)
        if min_sample_s <= 0:  # the dry run: one call per sample, no calibration call
            number[name] = 1
            continue
        once = _sample(fn, device, 1)
        number[name] = max(1, min(50, math.ceil(min_sample_s / max(once, 1e-6))))
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_sample(fn, device, number[name]))
    return {name: statistics.median(s) for name, s in samples.items()}


def timed(fns: Dict[str, Callable[[], None]], device, args) -> Tuple[Dict[str, float], Dict[str, str]]:
    """Medians of ``fns`` round-robin; should that fail, each alone, so one failing contender costs only its
    own number. Returns (seconds per call, error per contender)."""
    if not fns:
        return {}, {}
    try:
        return interleaved_medians(fns, device, args.repeats, args.warmup, args.min_sample), {}
    except Exception:
        release(device)
    times, errors = {}, {}
    for name, fn in fns.items():
        try:
            times.update(interleaved_medians({name: fn}, device, args.repeats, args.warmup, args.min_sample))
        except Exception as e:
            errors[name] = short_error(e)
            release(device)
    return times, errors


def peak_bytes(fn: Callable[[], None], device: torch.device) -> Optional[int]:
    """Allocator peak of one call above what was allocated before it (CUDA only)."""
    if device.type != 'cuda':
        return None
    _sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def release(device: torch.device) -> None:
    """Free what a failed call left behind; after a CUDA error this may raise too, and the next call reports it."""
    gc.collect()
    if device.type == 'cuda':
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except Exception:
            pass


def short_error(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [''])[0]
    return f'{type(e).__name__}: {first[:200]}'


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds * 1e3


def _ratio(a, b) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


# ---- output ------------------------------------------------------------------------------------------------------

def _fmt(value, spec: str = '.2f', suffix: str = '') -> str:
    return '-' if value is None else f'{value:{spec}}{suffix}'


def table(header: List[str], rows: List[List[str]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(str(c).replace('|', '/') for c in r) + ' |' for r in rows])


def write_atomic(path: str, text: str) -> None:
    """A kill mid-write leaves the previous version, never half a file."""
    with open(path + '.tmp', 'w') as f:
        f.write(text)
    os.replace(path + '.tmp', path)


def forced_failures() -> Dict[str, str]:
    """GPU_CHECK_FAIL=<section>[:error|crash|hang],...: the sections to fail on purpose, and how."""
    out = {}
    for item in filter(None, os.environ.get('GPU_CHECK_FAIL', '').split(',')):
        name, _, mode = item.strip().partition(':')
        out[name] = mode or 'error'
    return out


class Section:
    """One section's rows, written to ``<name>.md`` / ``<name>.json`` after every row and at the end."""

    def __init__(self, name: str, title: str, out_dir: str, meta: dict, render: Callable[[List[dict]], str],
                 derive: Optional[Callable[[List[dict]], None]] = None):
        os.makedirs(out_dir, exist_ok=True)
        self.name, self.title, self.meta, self.render, self.derive = name, title, meta, render, derive
        self.path = os.path.join(out_dir, name)
        self.rows: List[dict] = []
        self.status, self.error, self.trace = 'running', None, None
        self.start = time.monotonic()
        self.write()

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self.write()
        if len(self.rows) == 1:
            fail_on_purpose(self.name)
        return row

    def write(self) -> None:
        if self.derive:
            self.derive(self.rows)
        seconds = time.monotonic() - self.start
        data = dict(section=self.name, title=self.title, status=self.status, error=self.error, traceback=self.trace,
                    seconds=round(seconds, 1), meta=self.meta, rows=self.rows)
        write_atomic(self.path + '.json', json.dumps(data, indent=1, default=str))
        status = f'FAILED after {seconds:.0f} s: {self.error}' if self.status == 'failed' else \
            f'{self.status} ({seconds:.0f} s, {len(self.rows)} rows)'
        md = f'## {self.title}\n\nstatus: {status}\n\n{self.render(self.rows) if self.rows else "(no rows)"}\n'
        if self.trace:
            md += f'\n```text\n{self.trace}```\n'
        write_atomic(self.path + '.md', md)

    def finish(self, error: Optional[BaseException] = None) -> None:
        if error is None:
            self.status = 'ok'
        else:
            self.status, self.error = 'failed', short_error(error)
            self.trace = ''.join(traceback.format_exception(type(error), error, error.__traceback__)[-12:])
        self.write()
        print(f'\n## {self.title}\n\nstatus: {self.status}{": " + self.error if self.error else ""}\n\n'
              f'{self.render(self.rows) if self.rows else "(no rows)"}', flush=True)


def fail_on_purpose(name: str) -> None:
    mode = forced_failures().get(name)
    if mode is None:
        return
    print(f'GPU_CHECK_FAIL: {name} {mode}', flush=True)
    if mode == 'crash':  # as a fatal CUDA error would: the process dies, no exception handler runs
        import resource  # Unix only, as the GPU machine

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the checkout
        os.kill(os.getpid(), signal.SIGSEGV)
    if mode == 'hang':  # until the time limit of gpu_check.sh kills it
        while True:
            time.sleep(60)
    raise RuntimeError(f'forced failure of section {name} (GPU_CHECK_FAIL)')


def environment(device: torch.device, args) -> dict:
    meta = dict(device=platform.processor() or 'cpu', torch=torch.__version__, timm=timm.__version__,
                python=platform.python_version(), cuda=torch.version.cuda,
                mode='quick' if args.quick else 'full', date=time.strftime('%Y-%m-%d %H:%M:%S'))
    try:  # informative only: none of it may stop a section
        if device.type == 'cuda':
            meta['device'] = torch.cuda.get_device_name(device)
            meta['flash_built'] = torch.backends.cuda.is_flash_attention_available()
        meta['cudnn'] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        meta['tf32'] = f'matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn {torch.backends.cudnn.allow_tf32}'
        if hasattr(torch._C, '_get_sdp_priority_order'):
            meta['sdpa_priority'] = [BACKEND_NAMES.get(int(b), str(b)) for b in torch._C._get_sdp_priority_order()]
    except Exception as e:
        meta['environment_error'] = short_error(e)
    return meta


# ---- the SDPA calls ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def record_sdpa_calls(calls: list):
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q, k, v))
        return real(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


@contextlib.contextmanager
def values_padded(pad: bool):
    saved = sdpa_module.CUDA_PAD_VALUES_FOR_FLASH
    sdpa_module.CUDA_PAD_VALUES_FOR_FLASH = pad
    try:
        yield
    finally:
        sdpa_module.CUDA_PAD_VALUES_FOR_FLASH = saved


def _eligible(q, k, v) -> Dict[str, bool]:
    cuda = torch.backends.cuda
    try:
        params = cuda.SDPAParams(q, k, v, None, 0.0, False, False)  # torch >= 2.5: enable_gqa
    except TypeError:
        params = cuda.SDPAParams(q, k, v, None, 0.0, False)
    out = dict(flash=cuda.can_use_flash_attention(params), efficient=cuda.can_use_efficient_attention(params))
    if hasattr(cuda, 'can_use_cudnn_attention'):
        out['cudnn'] = cuda.can_use_cudnn_attention(params)
    return out


def sdpa_section(sec: Section, device: torch.device, args, stages: dict, clock: Clock) -> None:
    amp = torch.bfloat16
    for stage, (channels, size) in stages.items():
        for precision, dtype, pad in (('fp32', None, True), ('bf16', amp, True), ('bf16 narrow-v', amp, False)):
            if clock.left() < 5:
                sec.add(dict(stage=stage, precision=precision, note='skipped: time limit'))
                continue
            try:
                row = _sdpa_row(stage, channels, size, precision, dtype, pad, device, args.layer_batch)
            except Exception as e:
                row = dict(stage=stage, precision=precision, note=short_error(e))
                release(device)
            sec.add(row)


def _sdpa_row(stage, channels, size, precision, dtype, pad, device, batch) -> dict:
    layer = _our_layer(channels, 'sdpa', device)
    x = torch.randn(batch, channels, size, size, device=device)
    calls: list = []
    with torch.no_grad(), record_sdpa_calls(calls), values_padded(pad), \
            torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        layer(x)
    q, k, v = calls[0]
    row = dict(stage=stage, precision=precision, calls=len(calls), windows=sum(c[0].shape[0] for c in calls),
               q=list(q.shape), k=list(k.shape), v=list(v.shape), dtype=str(q.dtype).replace('torch.', ''),
               default_backend=BACKEND_NAMES.get(int(torch._fused_sdp_choice(q, k, v)), '?'))
    if device.type == 'cuda':
        try:
            row.update(_eligible(q, k, v))
        except Exception as e:  # the private eligibility API may differ; the rest of the row stands
            row['note'] = short_error(e)
    return row


def sdpa_table(rows: List[dict]) -> str:
    header = ['stage', 'precision', 'calls x windows', "q' / k' / v' (per call)", 'default backend', 'flash',
              'efficient', 'cudnn', 'note']
    return table(header, [[
        r['stage'], r['precision'], f"{r['calls']} x {r['windows'] // r['calls']}" if r.get('calls') else '-',
        f"{r['q'][2:]} / {r['k'][2:]} / {r['v'][2:]} {r['dtype']}" if 'q' in r else '-',
        r.get('default_backend', '-'), *[_fmt(r.get(b), '') for b in ('flash', 'efficient', 'cudnn')],
        r.get('note', '')] for r in rows])


# ---- the layer ---------------------------------------------------------------------------------------------------

def _our_layer(channels: int, impl: str, device: torch.device) -> HaloAttention:
    return HaloAttention(channels, block_size=BLOCK, halo_size=HALO, heads=HEADS, dim_head=channels // HEADS,
                         attn_impl=impl).to(device)


def make_layer(impl: str, channels: int, device: torch.device) -> torch.nn.Module:
    if impl == 'timm HaloAttn':
        return HaloAttn(channels, channels, num_heads=HEADS, block_size=BLOCK, halo_size=HALO).to(device)
    return _our_layer(channels, 'broadcast' if impl == 'ours broadcast' else 'sdpa', device)


def _layer_call(layer, x, amp, backward: bool, pad: bool) -> None:
    with values_padded(pad), torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        if not backward:
            with torch.no_grad():
                layer(x)
            return
        out = layer(x)
    out.float().sum().backward()


def layer_section(sec: Section, device: torch.device, args, stages: dict, clock: Clock) -> None:
    amp = torch.bfloat16
    for stage, (channels, size) in stages.items():
        for precision, dtype in (('fp32', None), ('bf16', amp)):
            impls = [i for i in LAYER_IMPLS if not (i == 'ours sdpa narrow-v' and dtype is None)]  # fp32: v narrow
            if clock.left() < (5 if args.quick else 30):
                rows = [dict(stage=stage, precision=precision, impl=i, note='skipped: time limit') for i in impls]
            else:
                try:
                    rows = _layer_rows(stage, channels, size, precision, dtype, impls, device, args)
                except Exception as e:  # building the layers or the input: the whole group is lost, not the rest
                    rows = [dict(stage=stage, precision=precision, impl=i, note=short_error(e)) for i in impls]
                    release(device)
            for row in rows:
                sec.add(row)


def _layer_rows(stage, channels, size, precision, dtype, impls, device, args) -> List[dict]:
    torch.manual_seed(0)
    layers = {i: make_layer(i, channels, device) for i in impls}
    x = torch.randn(args.layer_batch, channels, size, size, device=device, requires_grad=True)
    pads = {i: i != 'ours sdpa narrow-v' for i in impls}
    res: Dict[str, dict] = {i: {} for i in impls}
    notes: Dict[str, str] = {}
    for mode, backward in (('fwd', False), ('fwd_bwd', True)):
        times, errors = timed({i: partial(_layer_call, layers[i], x, dtype, backward, pads[i]) for i in impls},
                              device, args)
        for i in impls:
            res[i][mode] = times.get(i)
            if i in errors:
                notes.setdefault(i, f'{mode}: {errors[i]}')
    for i in impls:
        layers[i].zero_grad(set_to_none=True)
        x.grad = None
        try:
            res[i]['peak'] = peak_bytes(partial(_layer_call, layers[i], x, dtype, True, pads[i]), device)
        except Exception as e:
            res[i]['peak'] = None
            notes.setdefault(i, f'peak: {short_error(e)}')
            release(device)
    base = res['timm HaloAttn']
    rows = []
    for i in impls:
        r = res[i]
        rows.append(dict(
            stage=stage, precision=precision, impl=i, fwd_ms=_ms(r['fwd']), fwd_bwd_ms=_ms(r['fwd_bwd']),
            peak_mib=None if r['peak'] is None else r['peak'] / 2**20,
            fwd_x_timm=_ratio(base['fwd'], r['fwd']), fwd_bwd_x_timm=_ratio(base['fwd_bwd'], r['fwd_bwd']),
            mem_vs_timm=_ratio(r['peak'], base['peak']), note=notes.get(i, '')))
    del layers, x
    release(device)
    return rows


def layer_table(rows: List[dict]) -> str:
    header = ['stage', 'precision', 'impl', 'fwd ms', 'fwd+bwd ms', 'peak MiB', 'fwd x timm', 'fwd+bwd x timm',
              'memory / timm', 'note']
    return table(header, [[
        r['stage'], r['precision'], r['impl'], _fmt(r.get('fwd_ms')), _fmt(r.get('fwd_bwd_ms')),
        _fmt(r.get('peak_mib'), '.0f'), _fmt(r.get('fwd_x_timm'), '.2f', 'x'),
        _fmt(r.get('fwd_bwd_x_timm'), '.2f', 'x'), _fmt(r.get('mem_vs_timm'), '.2f', 'x'), r.get('note', ''),
    ] for r in rows])


# ---- the models --------------------------------------------------------------------------------------------------

def model_factory(name: str) -> Callable[[], torch.nn.Module]:
    if name == 'ours halonet_h1':
        return partial(timm.create_model, 'halonet_h1')
    if name == 'timm halonet_h1':
        return timm.models.byoanet.halonet_h1  # timm's own; the registry name is ours once timm_halo is imported
    return partial(timm.create_model, name)


def count_gmacs(name: str, img_size: int) -> Optional[float]:
    """Forward GMACs of one image, on a meta-device copy (nothing allocated or computed); None if that fails."""
    try:
        with torch.device('meta'):
            model = model_factory(name)().eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, img_size, img_size, device='meta'))
        return counter.get_total_flops() / 2e9
    except Exception as e:
        print(f'{name}: GMACs not counted: {short_error(e)}', flush=True)
        return None


def _model_step(model, x, target, amp, train: bool) -> None:
    with torch.autocast(x.device.type, dtype=amp):
        if not train:
            with torch.no_grad():
                model(x)
            return
        loss = F.cross_entropy(model(x).float(), target)
    loss.backward()


def models_section(sec: Section, device: torch.device, args, compiled: bool, clock: Clock) -> None:
    """Per mode (train first), each model is built and called once (a compile), its row written at once; then
    the ready ones are timed round-robin and their rows completed. A kill keeps every row written so far."""
    batch, img, amp = args.model_batch, args.img_size, torch.bfloat16
    names = args.compiled_models if compiled else MODELS
    variant = 'compiled' if compiled else 'eager'
    need = args.compile_estimate if compiled else 10  # seconds one model's first call may take
    gmacs = {m: count_gmacs(m, img) for m in names}
    x = torch.randn(batch, 3, img, img, device=device).to(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device=device)
    built: Dict[str, torch.nn.Module] = {}  # one copy per model for both modes: building costs seconds on CPU
    for train in (True,) if compiled and args.quick else (True, False):  # a dry run traces one graph per model
        mode = 'train' if train else 'infer'
        fns, rows = {}, {}
        for name in names:
            row = rows[name] = dict(model=name, mode=mode, variant=variant, img_per_s=None, ms=None,
                                    gmacs=gmacs[name], gmac_per_s=None, first_call_s=None, note='')
            if clock.left() < need:
                row['note'] = f'skipped: time limit ({clock.left():.0f} s left)'
                sec.add(row)
                continue
            try:
                if name not in built:
                    torch.manual_seed(0)
                    built[name] = model_factory(name)().to(device).to(memory_format=torch.channels_last)
                model = built[name].train(train)
                model.zero_grad(set_to_none=True)
                run = torch.compile(model, backend=args.compile_backend, dynamic=False) if compiled else model
                fn = partial(_model_step, run, x, target, amp, train)
                t0 = time.monotonic()
                fn()
                _sync(device)
                row['first_call_s'] = time.monotonic() - t0
                if args.quick:  # the dry run times the first call only: a CPU step costs seconds
                    row['ms'], row['note'] = _ms(row['first_call_s']), 'first call (quick)'
                else:
                    row['note'] = 'timing' if clock.left() > 5 else 'skipped: time limit'
                fns[name] = fn
            except Exception as e:
                row['note'] = short_error(e)
                release(device)
            sec.add(row)
        times, errors = timed({n: f for n, f in fns.items() if rows[n]['note'] == 'timing'}, device, args)
        for name in fns:
            row = rows[name]
            sec_per_call = times.get(name, row['first_call_s'] if args.quick else None)
            row['note'] = errors.get(name, '' if name in times else row['note'])
            if sec_per_call is not None:
                row['ms'], row['img_per_s'] = _ms(sec_per_call), batch / sec_per_call
                if row['gmacs'] is not None:
                    row['gmac_per_s'] = row['gmacs'] * (TRAIN_MACS_FACTOR if train else 1.0) * row['img_per_s']
        sec.write()
        del fns
        release(device)


def model_ratios(rows: List[dict]) -> None:
    """Each row against timm's halonet_h1 (img/s) and resnet50 (GMAC/s) of the same mode and variant."""
    by = {(r['model'], r['mode'], r['variant']): r for r in rows}
    for r in rows:
        timm_h1 = by.get(('timm halonet_h1', r['mode'], r['variant']), {})
        r50 = by.get(('resnet50', r['mode'], r['variant']), {})
        r['x_timm_halonet'] = _ratio(r['img_per_s'], timm_h1.get('img_per_s'))
        pct = _ratio(r['gmac_per_s'], r50.get('gmac_per_s'))
        r['gmac_per_s_pct_resnet50'] = None if pct is None else 100 * pct


def model_table(rows: List[dict]) -> str:
    header = ['model', 'mode', 'variant', 'img/s', 'ms/step', 'GMACs/img', 'GMAC/s', 'x timm halonet_h1',
              'GMAC/s % of resnet50', 'first call s', 'note']
    return table(header, [[
        r['model'], r['mode'], r['variant'], _fmt(r['img_per_s'], '.0f'), _fmt(r['ms'], '.1f'), _fmt(r['gmacs']),
        _fmt(r['gmac_per_s'], '.0f'), _fmt(r.get('x_timm_halonet'), '.2f', 'x'),
        _fmt(r.get('gmac_per_s_pct_resnet50'), '.0f', '%'), _fmt(r['first_call_s'], '.1f'), r['note']]
        for r in rows])


# ---- targets and the summary -------------------------------------------------------------------------------------

def targets(layer: List[dict], models: List[dict]) -> List[dict]:
    out = []

    def best(stage):  # our fastest bf16 sdpa variant at a stage
        rows = [r for r in layer if r['stage'].startswith(stage + ' ') and r['precision'] == 'bf16' and
                r['impl'].startswith('ours sdpa') and r.get('fwd_bwd_x_timm') is not None]
        return max(rows, key=lambda r: r['fwd_bwd_x_timm'], default=None)

    def add(measure, value, target, ok, where):
        out.append(dict(measure=measure, value=value, target=target, met=ok, where=where))

    s1, s3 = best('stage1'), best('stage3')
    add('layer fwd+bwd stage 1, bf16 (x timm)', _fmt(s1 and s1['fwd_bwd_x_timm'], '.2f', 'x'), '>= 4x',
        s1 is not None and s1['fwd_bwd_x_timm'] >= 4, s1 and s1['impl'])
    add('layer peak memory stage 1, bf16 (/ timm)', _fmt(s1 and s1.get('mem_vs_timm'), '.2f', 'x'), '<= 0.3x',
        s1 is not None and s1.get('mem_vs_timm') is not None and s1['mem_vs_timm'] <= 0.3, s1 and s1['impl'])
    add('layer fwd+bwd stage 3, bf16 (x timm)', _fmt(s3 and s3['fwd_bwd_x_timm'], '.2f', 'x'), '>= 2x',
        s3 is not None and s3['fwd_bwd_x_timm'] >= 2, s3 and s3['impl'])
    for variant in dict.fromkeys(r['variant'] for r in models):
        ours = next((r for r in models if r['model'] == 'ours halonet_h1' and r['mode'] == 'train'
                     and r['variant'] == variant), None)
        if ours is None:
            continue
        x, pct = ours.get('x_timm_halonet'), ours.get('gmac_per_s_pct_resnet50')
        add(f'halonet_h1 train step, {variant} (x timm halonet_h1)', _fmt(x, '.2f', 'x'), '>= 3x',
            x is not None and x >= 3, variant)
        add(f'halonet_h1 train GMAC/s, {variant} (% of resnet50)', _fmt(pct, '.0f', '%'), '>= 50%',
            pct is not None and pct >= 50, variant)
    return out


def targets_table(rows: List[dict]) -> str:
    return table(['measure', 'value', 'target', 'met', 'best variant'], [
        [r['measure'], r['value'], r['target'], 'yes' if r['met'] else 'NO', str(r['where'])] for r in rows])


def summary(out_dir: str) -> int:
    """gpu.md / gpu.json from the sections' files: environment, status of each, their tables, the targets."""
    found = {}
    for name in ('tests',) + SECTIONS:
        try:
            with open(os.path.join(out_dir, name + '.json')) as f:
                found[name] = json.load(f)
        except (OSError, ValueError):
            continue
    meta = dict(next((d['meta'] for d in found.values() if d.get('meta')), {}))
    meta.pop('budget_s', None)  # each section's own
    status = table(['section', 'status', 's', 'rows', 'error'], [
        [n, d.get('status'), _fmt(d.get('wall_s', d.get('seconds')), '.0f'), len(d.get('rows') or []),
         d.get('error') or '']
        for n, d in found.items()])
    parts = ['# GPU check\n', '\n'.join(f'- {k}: {v}' for k, v in meta.items()) + '\n', status + '\n']
    for name in found:
        with open(os.path.join(out_dir, name + '.md')) as f:
            parts.append(f.read())
    layer = [r for r in found.get('layer', {}).get('rows', []) if r.get('fwd_bwd_x_timm') is not None]
    models = [r for n in ('models_eager', 'models_compiled') for r in found.get(n, {}).get('rows', [])
              if 'model' in r]
    goals = targets(layer, models)
    parts.append('## Performance goals\n\n' + targets_table(goals) + '\n')
    write_atomic(os.path.join(out_dir, 'gpu.md'), '\n'.join(parts))
    write_atomic(os.path.join(out_dir, 'gpu.json'),
                 json.dumps(dict(meta=meta, sections=found, targets=goals), indent=1, default=str))
    return 0


# ---- main --------------------------------------------------------------------------------------------------------

def run_section(name: str, device: torch.device, args, out_dir: str) -> bool:
    clock = Clock(args.budget)
    # the dry run: stage 1 (maps of several blocks) and stage 4 (one block), the two shapes of the code path
    sizes = {k: (c, max(8, s // 4)) for k, (c, s) in STAGES.items() if k in ('stage1', 'stage4')} if args.quick \
        else STAGES
    stages = {f'{k} C{c} {s}x{s}': (c, s) for k, (c, s) in sizes.items()}
    meta = environment(device, args)
    meta.update(layer_batch=args.layer_batch, model_batch=args.model_batch, img_size=args.img_size,
                repeats=args.repeats, compile_backend=args.compile_backend, budget_s=args.budget)
    medians = f'medians of {args.repeats}'
    if name == 'layer':
        sec = Section(name, f'Layer vs timm HaloAttn (batch {args.layer_batch}, {medians})', out_dir, meta,
                      layer_table)
        run = partial(layer_section, sec, device, args, stages, clock)
    elif name == 'sdpa':
        sec = Section(name, f'SDPA calls and backends (batch {args.layer_batch})', out_dir, meta, sdpa_table)
        run = partial(sdpa_section, sec, device, args, stages, clock)
    else:
        compiled = name == 'models_compiled'
        how = f'torch.compile, backend {args.compile_backend}' if compiled else 'eager'
        sec = Section(name, f'Models, {how} (batch {args.model_batch}, {args.img_size} px, bf16 autocast, '
                      f'channels-last, {medians})', out_dir, meta, model_table, model_ratios)
        run = partial(models_section, sec, device, args, compiled, clock)
    try:
        run()
    except Exception as e:  # any error, not only out-of-memory: recorded, and the next section still runs
        sec.finish(e)
        return False
    sec.finish()
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--section', default=','.join(SECTIONS), help=f'comma-separated, of {",".join(SECTIONS)}')
    parser.add_argument('--summary', action='store_true', help='only gather the sections\' files into gpu.md/json')
    parser.add_argument('--device', default='cuda', help='cuda (default) or cpu (a dry run with --quick)')
    parser.add_argument('--quick', action='store_true', help='tiny sizes, one sample: checks the script runs')
    parser.add_argument('--out', default=None, help='output folder (default: $OUT, else benchmarks/out/gpu)')
    parser.add_argument('--budget', type=float, default=420.0, help='seconds for each section; what would not '
                        'fit is skipped (and says so)')
    parser.add_argument('--compile-backend', default=None, help='torch.compile backend (default: inductor; '
                        'eager for a CPU --quick run)')
    args = parser.parse_args(argv)
    out_dir = args.out or os.environ.get('OUT') or os.path.join('benchmarks', 'out', 'gpu')
    if args.summary:
        return summary(out_dir)
    names = [s for s in args.section.split(',') if s]
    unknown = set(names) - set(SECTIONS)
    if unknown:
        parser.error(f'unknown section(s) {sorted(unknown)}; known: {", ".join(SECTIONS)}')
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        print('no CUDA device: run with --device cpu --quick for a dry run', file=sys.stderr)
        return 2
    quick = args.quick
    args.layer_batch = 2 if quick else 64
    args.model_batch = 1 if quick else 128
    args.img_size = 256  # timm's halonet_h1 needs every stage's map divisible by its block size 8
    args.repeats = 1 if quick else 10
    args.warmup = 0 if quick else 3
    args.min_sample = 0.0 if quick else 0.02
    args.compile_estimate = 5 if quick else 60
    args.compiled_models = MODELS[:1] if quick else MODELS  # a dry run compiles ours only: a trace costs seconds
    if args.compile_backend is None:
        args.compile_backend = 'eager' if quick and device.type == 'cpu' else 'inductor'
    ok = [run_section(name, device, args, out_dir) for name in names]
    if len(names) > 1:
        summary(out_dir)
    return 0 if all(ok) else 1


if __name__ == '__main__':
    sys.exit(main())
