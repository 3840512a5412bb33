"""The GPU check: HaloAttention's fused CUDA path against timm, layer and whole model, in one run.

    python -m benchmarks.gpu [--device cuda|cpu] [--quick] [--out DIR] [--budget SECONDS] [--no-compile]

Sections, each written to ``gpu.md`` / ``gpu.json`` in the output folder as soon as it is done (``$OUT`` if set,
else ``benchmarks/out/gpu``), so a run cut short keeps what it measured:

1. SDPA calls: the q'/k'/v' that ``attn_impl='sdpa'`` hands to ``F.scaled_dot_product_attention`` at each of
   HaloNet-H1's stage shapes (batch 64), the backend SDPA picks by default, and which CUDA backends accept it.
2. Layer: ours ('sdpa' with values padded for flash, 'sdpa narrow-v' with values at their own width, 'broadcast')
   vs timm's ``HaloAttn`` at the four stage shapes (batch 64, block 8, halo 3, 8 heads of C/8), fp32 and bf16
   autocast: forward (no grad), forward+backward (input gradient too), peak memory of one forward+backward above
   what was allocated before it (``torch.cuda.max_memory_allocated``).
3. Models: ours halonet_h1 vs timm's own halonet_h1 (``timm.models.byoanet.halonet_h1``; the name in timm's
   registry is ours once timm_halo is imported) vs resnet50, all at 256 px, bf16 autocast, channels-last, batch
   128: inference and train step (forward + cross-entropy + backward, no optimizer step), eager and
   ``torch.compile``. GMACs per image are counted once per model with ``FlopCounterMode`` on a meta-device copy
   (so ours counts the maths of its plain path: the cropped late-stage windows, not the padding and one-hot
   columns of the fused call); GMAC/s = GMACs per image x img/s (a train step counts as 3 forwards).
4. Targets: the issue's targets, each marked met or not, from the ratios of the same run.

Timings: CUDA events around each sample (host clock on CPU), several samples per contender taken round-robin
with its peers, medians. ``--quick`` shrinks the sizes (layer: batch 2, maps / 4; models: batch 1; 2 samples) for a dry
run; on CPU it compiles with the ``eager`` backend (dynamo's tracing, no code generation) so the whole script runs
in a few minutes on 2 cores.
"""
import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from functools import partial
from typing import Callable, Dict, List, Optional

import timm
import torch
import torch.nn.functional as F
from timm.layers.halo_attn import HaloAttn
from torch.nn.attention import SDPBackend
from torch.utils.flop_counter import FlopCounterMode

import timm_halo  # noqa: F401  (registers halonet_* with timm)
from timm_halo.layers import HaloAttention
from timm_halo.layers import sdpa as sdpa_module

STAGES = {  # name: (channels, map size), as HaloNet-H1 at 256 px; batch from the command line
    'stage1 C64 64x64': (64, 64),
    'stage2 C128 32x32': (128, 32),
    'stage3 C256 16x16': (256, 16),
    'stage4 C512 8x8': (512, 8),
}
BLOCK, HALO, HEADS = 8, 3, 8
LAYER_IMPLS = ('timm HaloAttn', 'ours sdpa', 'ours sdpa narrow-v', 'ours broadcast')
MODELS = ('ours halonet_h1', 'timm halonet_h1', 'resnet50')
TRAIN_MACS_FACTOR = 3.0  # backward: gradients w.r.t. inputs and weights, about two forwards
BACKEND_NAMES = {int(b): n for n, b in SDPBackend.__members__.items()}


# ---- timing and output ---------------------------------------------------------------------------------------------

class Clock:
    """Wall-clock budget of the whole run."""

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
        once = _sample(fn, device, 1)
        number[name] = max(1, min(50, math.ceil(min_sample_s / max(once, 1e-6))))
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_sample(fn, device, number[name]))
    return {name: statistics.median(s) for name, s in samples.items()}


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


def _fmt(value, spec: str = '.2f', suffix: str = '') -> str:
    return '-' if value is None else f'{value:{spec}}{suffix}'


def table(header: List[str], rows: List[List[str]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows])


class Report:
    """Markdown and JSON written after every section."""

    def __init__(self, out_dir: str, meta: dict):
        os.makedirs(out_dir, exist_ok=True)
        self.md_path, self.json_path = os.path.join(out_dir, 'gpu.md'), os.path.join(out_dir, 'gpu.json')
        self.meta, self.sections, self.data = meta, [], dict(meta=meta)

    def add(self, title: str, markdown: str, key: str, rows) -> None:
        self.sections.append(f'## {title}\n\n{markdown}\n')
        self.data[key] = rows
        print(f'\n## {title}\n\n{markdown}', flush=True)
        with open(self.md_path, 'w') as f:
            f.write('# GPU check\n\n' + '\n'.join(f'- {k}: {v}' for k, v in self.meta.items()) + '\n\n')
            f.write('\n'.join(self.sections))
        with open(self.json_path, 'w') as f:
            json.dump(self.data, f, indent=1, default=str)


def environment(device: torch.device, args) -> dict:
    meta = dict(
        device=torch.cuda.get_device_name(device) if device.type == 'cuda' else (platform.processor() or 'cpu'),
        torch=torch.__version__, timm=timm.__version__, python=platform.python_version(),
        cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        tf32=f'matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn {torch.backends.cudnn.allow_tf32}',
        sdpa_priority=[BACKEND_NAMES.get(int(b), str(b)) for b in torch._C._get_sdp_priority_order()]
        if hasattr(torch._C, '_get_sdp_priority_order') else None,
        mode='quick' if args.quick else 'full', date=time.strftime('%Y-%m-%d %H:%M:%S'),
    )
    if device.type == 'cuda':
        meta['flash_built'] = torch.backends.cuda.is_flash_attention_available()
    return meta


# ---- 1. the SDPA calls -------------------------------------------------------------------------------------------

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
    params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, False)
    cuda = torch.backends.cuda
    return dict(flash=cuda.can_use_flash_attention(params), efficient=cuda.can_use_efficient_attention(params),
                cudnn=cuda.can_use_cudnn_attention(params))


def sdpa_calls(device: torch.device, batch: int, stages: dict, amp: torch.dtype) -> List[dict]:
    rows = []
    for stage, (channels, size) in stages.items():
        layer = _our_layer(channels, 'sdpa', device)
        x = torch.randn(batch, channels, size, size, device=device)
        for precision, dtype in (('fp32', None), ('bf16', amp)):
            for pad in ((True, False) if dtype is not None else (True,)):
                calls: list = []
                with torch.no_grad(), record_sdpa_calls(calls), values_padded(pad), \
                        torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    layer(x)
                q, k, v = calls[0]
                row = dict(stage=stage, precision=precision + ('' if pad else ' narrow-v'), calls=len(calls),
                           windows=sum(c[0].shape[0] for c in calls), q=list(q.shape), k=list(k.shape),
                           v=list(v.shape), dtype=str(q.dtype).replace('torch.', ''),
                           default_backend=BACKEND_NAMES.get(int(torch._fused_sdp_choice(q, k, v)), '?'))
                if device.type == 'cuda':
                    row.update(_eligible(q, k, v))
                rows.append(row)
                del calls, q, k, v
    return rows


def sdpa_table(rows: List[dict]) -> str:
    header = ['stage', 'precision', 'calls x windows', "q' / k' / v' (per call)", 'default backend', 'flash',
              'efficient', 'cudnn']
    return table(header, [[
        r['stage'], r['precision'], f"{r['calls']} x {r['windows'] // r['calls']}",
        f"{r['q'][2:]} / {r['k'][2:]} / {r['v'][2:]} {r['dtype']}", r['default_backend'],
        *[_fmt(r.get(b), '') for b in ('flash', 'efficient', 'cudnn')]] for r in rows])


# ---- 2. the layer ------------------------------------------------------------------------------------------------

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


def layer_rows(device, batch, stages, amp, args, clock: Clock) -> List[dict]:
    rows = []
    for stage, (channels, size) in stages.items():
        for precision, dtype in (('fp32', None), ('bf16', amp)):
            if clock.left() < 30:
                print(f'budget: skipping layer {stage} {precision}', flush=True)
                continue
            impls = [i for i in LAYER_IMPLS if not (i == 'ours sdpa narrow-v' and dtype is None)]  # fp32: v narrow
            torch.manual_seed(0)
            layers = {i: make_layer(i, channels, device) for i in impls}
            x = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
            pads = {i: i != 'ours sdpa narrow-v' for i in impls}
            res: Dict[str, dict] = {i: {} for i in impls}
            for mode, backward in (('fwd', False), ('fwd_bwd', True)):
                fns = {i: partial(_layer_call, layers[i], x, dtype, backward, pads[i]) for i in impls}
                try:
                    times = interleaved_medians(fns, device, args.repeats, args.warmup, args.min_sample)
                except torch.cuda.OutOfMemoryError:
                    times = {}
                for i in impls:
                    res[i][mode] = times.get(i)
            for i in impls:
                layers[i].zero_grad(set_to_none=True)
                x.grad = None
                try:
                    res[i]['peak'] = peak_bytes(partial(_layer_call, layers[i], x, dtype, True, pads[i]), device)
                except torch.cuda.OutOfMemoryError:
                    res[i]['peak'] = None
            base = res['timm HaloAttn']
            for i in impls:
                r = res[i]
                rows.append(dict(
                    stage=stage, precision=precision, impl=i, fwd_ms=_ms(r['fwd']), fwd_bwd_ms=_ms(r['fwd_bwd']),
                    peak_mib=None if r['peak'] is None else r['peak'] / 2**20,
                    fwd_x_timm=_ratio(base['fwd'], r['fwd']), fwd_bwd_x_timm=_ratio(base['fwd_bwd'], r['fwd_bwd']),
                    mem_vs_timm=_ratio(r['peak'], base['peak'])))
            del layers, x
            if device.type == 'cuda':
                torch.cuda.empty_cache()
    return rows


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds * 1e3


def _ratio(a, b) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def layer_table(rows: List[dict]) -> str:
    header = ['stage', 'precision', 'impl', 'fwd ms', 'fwd+bwd ms', 'peak MiB', 'fwd x timm', 'fwd+bwd x timm',
              'memory / timm']
    return table(header, [[
        r['stage'], r['precision'], r['impl'], _fmt(r['fwd_ms']), _fmt(r['fwd_bwd_ms']), _fmt(r['peak_mib'], '.0f'),
        _fmt(r['fwd_x_timm'], '.2f', 'x'), _fmt(r['fwd_bwd_x_timm'], '.2f', 'x'), _fmt(r['mem_vs_timm'], '.2f', 'x'),
    ] for r in rows])


# ---- 3. the models -----------------------------------------------------------------------------------------------

def model_factory(name: str) -> Callable[[], torch.nn.Module]:
    if name == 'ours halonet_h1':
        return partial(timm.create_model, 'halonet_h1')
    if name == 'timm halonet_h1':
        return timm.models.byoanet.halonet_h1  # timm's own; the registry name is ours once timm_halo is imported
    return partial(timm.create_model, name)


def count_gmacs(name: str, img_size: int) -> float:
    """Forward GMACs of one image, on a meta-device copy (nothing allocated or computed)."""
    with torch.device('meta'):
        model = model_factory(name)().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, img_size, img_size, device='meta'))
    return counter.get_total_flops() / 2e9


def _model_step(model, x, target, amp, train: bool) -> None:
    with torch.autocast(x.device.type, dtype=amp):
        if not train:
            with torch.no_grad():
                model(x)
            return
        loss = F.cross_entropy(model(x).float(), target)
    loss.backward()


def model_rows(device, args, amp, clock: Clock) -> List[dict]:
    batch, img = args.model_batch, args.img_size
    gmacs = {m: count_gmacs(m, img) for m in MODELS}
    x = torch.randn(batch, 3, img, img, device=device).to(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device=device)
    rows = []
    # Compiled train steps first: they matter most and compiling is what runs out of budget.
    runs = [('eager', False, False), ('eager', False, True)]
    if args.compile:
        runs += [('compiled', True, True), ('compiled', True, False)]
    for variant, compiled, train in runs:
        mode = 'train' if train else 'infer'
        fns, compile_s = {}, {}
        models = {}
        for name in MODELS:
            need = args.compile_estimate if compiled else 10
            if clock.left() < need + 20:
                print(f'budget: skipping {name} {variant} {mode} ({clock.left():.0f} s left)', flush=True)
                continue
            torch.manual_seed(0)
            model = model_factory(name)().to(device).to(memory_format=torch.channels_last)
            model.train(train)
            models[name] = model
            run = torch.compile(model, backend=args.compile_backend, dynamic=False) if compiled else model
            fn = partial(_model_step, run, x, target, amp, train)
            t0 = time.monotonic()
            try:
                fn()
                _sync(device)
            except torch.cuda.OutOfMemoryError:
                print(f'{name} {variant} {mode}: out of memory', flush=True)
                continue
            compile_s[name] = time.monotonic() - t0
            fns[name] = fn
        try:
            times = interleaved_medians(fns, device, args.repeats, args.warmup, args.min_sample) if fns else {}
        except torch.cuda.OutOfMemoryError:
            times = {}
        for name in MODELS:
            sec = times.get(name)
            ips = None if sec is None else batch / sec
            step_gmacs = gmacs[name] * (TRAIN_MACS_FACTOR if train else 1.0)
            rows.append(dict(model=name, mode=mode, variant=variant, img_per_s=ips, ms=_ms(sec),
                             gmacs=gmacs[name], gmac_per_s=None if ips is None else step_gmacs * ips,
                             first_call_s=compile_s.get(name)))
        del fns, models
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    by = {(r['model'], r['mode'], r['variant']): r for r in rows}
    for r in rows:
        timm_h1, r50 = by[('timm halonet_h1', r['mode'], r['variant'])], by[('resnet50', r['mode'], r['variant'])]
        r['x_timm_halonet'] = _ratio(r['img_per_s'], timm_h1['img_per_s'])
        r['gmac_per_s_pct_resnet50'] = None if _ratio(r['gmac_per_s'], r50['gmac_per_s']) is None else \
            100 * r['gmac_per_s'] / r50['gmac_per_s']
    return rows


def model_table(rows: List[dict]) -> str:
    header = ['model', 'mode', 'variant', 'img/s', 'ms/step', 'GMACs/img', 'GMAC/s', 'x timm halonet_h1',
              'GMAC/s % of resnet50', 'first call s']
    return table(header, [[
        r['model'], r['mode'], r['variant'], _fmt(r['img_per_s'], '.0f'), _fmt(r['ms'], '.1f'), _fmt(r['gmacs']),
        _fmt(r['gmac_per_s'], '.0f'), _fmt(r['x_timm_halonet'], '.2f', 'x'),
        _fmt(r['gmac_per_s_pct_resnet50'], '.0f', '%'), _fmt(r['first_call_s'], '.1f')] for r in rows])


# ---- 4. targets --------------------------------------------------------------------------------------------------

def targets(layer: List[dict], models: List[dict], stages: dict) -> List[dict]:
    names = list(stages)
    out = []

    def best(stage):  # our fastest bf16 sdpa variant at a stage
        rows = [r for r in layer if r['stage'] == stage and r['precision'] == 'bf16' and r['impl'].startswith(
            'ours sdpa') and r['fwd_bwd_x_timm'] is not None]
        return max(rows, key=lambda r: r['fwd_bwd_x_timm'], default=None)

    def add(measure, value, target, ok, where):
        out.append(dict(measure=measure, value=value, target=target, met=ok, where=where))

    s1, s3 = best(names[0]), best(names[2])
    add('layer fwd+bwd stage 1, bf16 (x timm)', _fmt(s1 and s1['fwd_bwd_x_timm'], '.2f', 'x'), '>= 4x',
        s1 is not None and s1['fwd_bwd_x_timm'] >= 4, s1 and s1['impl'])
    add('layer peak memory stage 1, bf16 (/ timm)', _fmt(s1 and s1['mem_vs_timm'], '.2f', 'x'), '<= 0.3x',
        s1 is not None and s1['mem_vs_timm'] is not None and s1['mem_vs_timm'] <= 0.3, s1 and s1['impl'])
    add('layer fwd+bwd stage 3, bf16 (x timm)', _fmt(s3 and s3['fwd_bwd_x_timm'], '.2f', 'x'), '>= 2x',
        s3 is not None and s3['fwd_bwd_x_timm'] >= 2, s3 and s3['impl'])
    for variant in dict.fromkeys(r['variant'] for r in models):
        ours = next((r for r in models if r['model'] == 'ours halonet_h1' and r['mode'] == 'train'
                     and r['variant'] == variant), None)
        if ours is None:
            continue
        x, pct = ours['x_timm_halonet'], ours['gmac_per_s_pct_resnet50']
        add(f'halonet_h1 train step, {variant} (x timm halonet_h1)', _fmt(x, '.2f', 'x'), '>= 3x',
            x is not None and x >= 3, variant)
        add(f'halonet_h1 train GMAC/s, {variant} (% of resnet50)', _fmt(pct, '.0f', '%'), '>= 50%',
            pct is not None and pct >= 50, variant)
    return out


def targets_table(rows: List[dict]) -> str:
    return table(['measure', 'value', 'target', 'met', 'best variant'], [
        [r['measure'], r['value'], r['target'], 'yes' if r['met'] else 'NO', str(r['where'])] for r in rows])


# ---- main --------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda', help='cuda (default) or cpu (a dry run with --quick)')
    parser.add_argument('--quick', action='store_true', help='tiny sizes and 2 samples: checks the script runs')
    parser.add_argument('--out', default=None, help='output folder (default: $OUT, else benchmarks/out/gpu)')
    parser.add_argument('--budget', type=float, default=420.0, help='seconds for the whole run; sections and '
                        'compiled models that would not fit are skipped (and say so)')
    parser.add_argument('--no-compile', dest='compile', action='store_false', help='skip the torch.compile rows')
    parser.add_argument('--compile-backend', default=None, help='torch.compile backend (default: inductor; '
                        'eager for a CPU --quick run)')
    parser.add_argument('--sections', default='sdpa,layer,model', help='comma-separated subset of sdpa,layer,model')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        print('no CUDA device: run with --device cpu --quick for a dry run', file=sys.stderr)
        return 2
    quick = args.quick
    args.layer_batch = 2 if quick else 64
    args.model_batch = 1 if quick else 128
    args.img_size = 256  # timm's halonet_h1 needs every stage's map divisible by its block size 8
    args.repeats = 2 if quick else 10
    args.warmup = 1 if quick else 3
    args.min_sample = 0.0 if quick else 0.02
    args.compile_estimate = 30 if quick else 90
    if args.compile_backend is None:
        args.compile_backend = 'eager' if quick and device.type == 'cpu' else 'inductor'
    stages = {k: (c, max(8, s // 4) if quick else s) for k, (c, s) in STAGES.items()}
    amp = torch.bfloat16
    out_dir = args.out or os.environ.get('OUT') or os.path.join('benchmarks', 'out', 'gpu')
    clock = Clock(args.budget)
    sections = set(args.sections.split(','))

    meta = environment(device, args)
    meta.update(layer_batch=args.layer_batch, model_batch=args.model_batch, img_size=args.img_size,
                repeats=args.repeats, compile_backend=args.compile_backend if args.compile else 'off')
    report = Report(out_dir, meta)
    print('# GPU check\n' + '\n'.join(f'- {k}: {v}' for k, v in meta.items()), flush=True)

    if 'sdpa' in sections:
        rows = sdpa_calls(device, args.layer_batch, stages, amp)
        report.add(f'SDPA calls (batch {args.layer_batch})', sdpa_table(rows), 'sdpa_calls', rows)
    layer: List[dict] = []
    if 'layer' in sections:
        layer = layer_rows(device, args.layer_batch, stages, amp, args, clock)
        report.add(f'Layer vs timm HaloAttn (batch {args.layer_batch}, medians of {args.repeats})',
                   layer_table(layer), 'layer', layer)
    models: List[dict] = []
    if 'model' in sections:
        models = model_rows(device, args, amp, clock)
        report.add(f'Models (batch {args.model_batch}, {args.img_size} px, bf16 autocast, channels-last, medians of '
                   f'{args.repeats})', model_table(models), 'models', models)
    if layer or models:
        rows = targets(layer, models, stages)
        report.add('Targets (issue 12)', targets_table(rows), 'targets', rows)
    print(f'\nwrote {report.md_path} and {report.json_path} ({time.monotonic() - clock.start:.0f} s)', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
