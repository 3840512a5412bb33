"""The GPU check's sections: HaloAttention's CUDA path against timm, layer and whole model (docs/benchmarks.md)."""
import argparse
import contextlib
import gc
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union
from unittest import mock

import timm
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from benchmarks.layer import STAGES, call, make_layer
from benchmarks.model import MODELS, OURS, RESNET, TIMM
from benchmarks.plot import yes_no
from timm_halo import bench  # (importing timm_halo registers halonet_* with timm)
from timm_halo.bench import table

SECTIONS = ('layer', 'sdpa', 'models_eager', 'models_compiled')  # gpu_check.sh runs 'tests' itself, first
# contender: benchmarks.layer's name of the same layer (block 8, halo 3, 8 heads of C/8)
LAYER_IMPLS = {'timm HaloAttn': 'timm', 'ours sdpa': 'timm_halo sdpa', 'ours sdpa narrow-v': 'timm_halo sdpa',
               'ours broadcast': 'timm_halo broadcast'}
MIN_SAMPLE_S = 0.02  # a timing sample repeats a call to last this long: timing sub-millisecond calls is noisy
BACKEND_NAMES = {int(b): n for n, b in SDPBackend.__members__.items()}


# ---- timing and failures -----------------------------------------------------------------------------------------

def short_error(e: BaseException) -> str:
    return f'{type(e).__name__}: {(str(e).strip().splitlines() or [""])[0][:200]}'


def release(device: torch.device) -> None:
    """Free what a failed call (or a finished mode) left behind."""
    gc.collect()
    if device.type == 'cuda':
        with contextlib.suppress(Exception):  # after a CUDA error this may raise too; the next call reports it
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()


def attempt(fn: Callable[[], Any], device: torch.device) -> Tuple[Any, str]:
    """(fn(), ''); should it raise, (None, the error in one line), after freeing what the call left behind."""
    try:
        return fn(), ''
    except Exception as e:
        release(device)
        return None, short_error(e)


def medians(fns: Dict[str, Callable[[], None]], args) -> Dict[str, float]:
    """Median seconds per call, samples taken round-robin (``timm_halo.bench``); the dry run: one call a sample."""
    once = {} if args.quick else bench.interleaved_medians(fns, repeats=1, warmup=args.warmup)
    number = {n: max(1, min(50, math.ceil(MIN_SAMPLE_S / max(s, 1e-6)))) for n, s in once.items()}
    return bench.interleaved_medians(fns, args.repeats, 0, number=number)


def timed(fns: Dict[str, Callable[[], None]], args) -> Tuple[Dict[str, float], Dict[str, str]]:
    """(seconds per call, error per contender): ``medians`` of all, else of each alone (an error costs one number)."""
    times, error = attempt(partial(medians, fns, args), args.device)
    if not error:
        return times, {}
    alone = {name: attempt(partial(medians, {name: fn}, args), args.device) for name, fn in fns.items()}
    return {n: t[n] for n, (t, _) in alone.items() if t}, {n: e for n, (_, e) in alone.items() if e}


def guarded(args, need_s: float, base_rows: List[dict], measure: Callable[[], List[dict]]) -> List[dict]:
    """``measure()``'s rows; else ``base_rows`` with why not: too little time left, or the error it raised."""
    rows, error = attempt(measure, args.device) if args.deadline - time.monotonic() >= need_s else (
        None, 'skipped: time limit')
    return [dict(r, note=error) for r in base_rows] if error else rows


def _ratio(a: Optional[float], b: Optional[float], scale: float = 1.0) -> Optional[float]:
    return None if a is None or b is None or b == 0 else scale * a / b


# ---- output ------------------------------------------------------------------------------------------------------

def write_atomic(path: Union[str, Path], text: str) -> None:  # a kill mid-write leaves the previous version whole
    Path(f'{path}.tmp').write_text(text)
    os.replace(f'{path}.tmp', path)


def fail_on_purpose(name: str) -> None:
    """GPU_CHECK_FAIL=<section>[:error|crash|hang],...: fail this section, as asked (at its first row)."""
    items = (item.strip().partition(':') for item in os.environ.get('GPU_CHECK_FAIL', '').split(','))
    if mode := {n: m or 'error' for n, _, m in items}.get(name):
        print(f'GPU_CHECK_FAIL: {name} {mode}', flush=True)
        if mode == 'crash':  # as a fatal CUDA error would: the process dies, no exception handler runs
            import resource  # Unix only, as the GPU machine

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the checkout
            os.kill(os.getpid(), signal.SIGSEGV)
        while mode == 'hang':  # until the time limit of gpu_check.sh kills it
            time.sleep(60)
        raise RuntimeError(f'forced failure of section {name} (GPU_CHECK_FAIL)')


class Section:
    """One section's rows, rewritten to ``<name>.md`` / ``<name>.json`` after every row and at the end."""

    def __init__(self, name: str, title: str, args, columns: list, derive: Optional[Callable[[List[dict]], None]]):
        os.makedirs(args.out, exist_ok=True)
        self.name, self.title, self.meta, self.columns, self.derive = name, title, args.meta, columns, derive
        self.path, self.rows, self.start = os.path.join(args.out, name), [], time.monotonic()
        self.status, self.error, self.trace = 'running', None, None
        self.write()

    def add(self, *rows: dict) -> None:
        for row in rows:
            self.rows.append(row)
            self.write()
            if len(self.rows) == 1:
                fail_on_purpose(self.name)

    def write(self) -> str:
        if self.derive:
            self.derive(self.rows)
        seconds = time.monotonic() - self.start
        data = dict(section=self.name, title=self.title, status=self.status, error=self.error, traceback=self.trace,
                    seconds=round(seconds, 1), meta=self.meta, rows=self.rows)
        write_atomic(self.path + '.json', json.dumps(data, indent=1, default=str))
        status = f'FAILED after {seconds:.0f} s: {self.error}' if self.status == 'failed' else \
            f'{self.status} ({seconds:.0f} s, {len(self.rows)} rows)'
        md = f'## {self.title}\n\nstatus: {status}\n\n{table(self.columns, self.rows) if self.rows else "(no rows)"}\n'
        md += f'\n```text\n{self.trace}```\n' if self.trace else ''
        write_atomic(self.path + '.md', md)
        return md


def environment(args) -> dict:
    meta = dict(device=platform.processor() or 'cpu', torch=torch.__version__, timm=timm.__version__,
                python=platform.python_version(), cuda=torch.version.cuda,
                mode='quick' if args.quick else 'full', date=time.strftime('%Y-%m-%d %H:%M:%S'))
    try:  # informative only: none of it may stop a section
        if args.device.type == 'cuda':
            meta.update(device=torch.cuda.get_device_name(args.device),
                        flash_built=torch.backends.cuda.is_flash_attention_available())
        meta['cudnn'] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        meta['tf32'] = f'matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn {torch.backends.cudnn.allow_tf32}'
        if hasattr(torch._C, '_get_sdp_priority_order'):
            meta['sdpa_priority'] = [BACKEND_NAMES.get(int(b), str(b)) for b in torch._C._get_sdp_priority_order()]
    except Exception as e:
        meta['environment_error'] = short_error(e)
    return meta


# ---- the SDPA calls ----------------------------------------------------------------------------------------------

def _eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Dict[str, bool]:
    cuda = torch.backends.cuda
    params = cuda.SDPAParams(q, k, v, None, 0.0, False, False)  # attn_mask, dropout, is_causal, enable_gqa
    return {b: getattr(cuda, f'can_use_{b}_attention')(params) for b in ('flash', 'efficient', 'cudnn')
            if hasattr(cuda, f'can_use_{b}_attention')}  # cuDNN's since torch 2.5


def sdpa_section(sec: Section, args) -> None:
    for stage, (channels, size) in args.stages.items():
        for precision, dtype, pad in (('fp32', None, True), ('bf16', torch.bfloat16, True),
                                      ('bf16 narrow-v', torch.bfloat16, False)):
            measure = partial(_sdpa_rows, stage, channels, size, precision, dtype, pad, args)
            sec.add(*guarded(args, 5, [dict(stage=stage, precision=precision)], measure))


def _sdpa_rows(stage: str, channels: int, size: int, precision: str, dtype, pad: bool, args) -> List[dict]:
    layer = make_layer('timm_halo sdpa', channels, args.device)
    x = torch.randn(args.layer_batch, channels, size, size, device=args.device)
    with mock.patch.object(F, 'scaled_dot_product_attention', wraps=F.scaled_dot_product_attention) as spy:
        call(layer, x, False, dtype, pad)
    calls = [c.args[:3] for c in spy.call_args_list]
    q, k, v = calls[0]
    windows, dtype = sum(c[0].shape[0] for c in calls), str(q.dtype).replace('torch.', '')
    shapes = [list(t.shape) for t in (q, k, v)]
    row = dict(stage=stage, precision=precision, calls=len(calls), windows=windows, **dict(zip('qkv', shapes)),
               dtype=dtype, calls_x_windows=f'{len(calls)} x {windows // len(calls)}',
               per_call=' / '.join(str(s[2:]) for s in shapes) + f' {dtype}',
               default_backend=BACKEND_NAMES.get(int(torch._fused_sdp_choice(q, k, v)), '?'), note='')
    if args.device.type == 'cuda':  # the private eligibility API may differ; the rest of the row stands
        eligible, row['note'] = attempt(partial(_eligible, q, k, v), args.device)
        row.update(eligible or {})
    return [row]


SDPA_COLUMNS = ['stage', 'precision', ('calls x windows', 'calls_x_windows', '{}'), ("q' / k' / v' (per call)",
                'per_call', '{}'), ('default backend', 'default_backend', '{}'), 'flash', 'efficient', 'cudnn', 'note']


# ---- the layer ---------------------------------------------------------------------------------------------------

def layer_section(sec: Section, args) -> None:
    for stage, (channels, size) in args.stages.items():
        for precision, dtype in (('fp32', None), ('bf16', torch.bfloat16)):
            impls = [i for i in LAYER_IMPLS if not (i == 'ours sdpa narrow-v' and dtype is None)]  # fp32: v narrow
            base = [dict(stage=stage, precision=precision, impl=i) for i in impls]
            measure = partial(_layer_rows, stage, channels, size, precision, dtype, impls, args)
            sec.add(*guarded(args, 5 if args.quick else 30, base, measure))


def _layer_rows(stage: str, channels: int, size: int, precision: str, dtype, impls: List[str], args) -> List[dict]:
    torch.manual_seed(0)
    layers = {i: make_layer(LAYER_IMPLS[i], channels, args.device) for i in impls}
    x = torch.randn(args.layer_batch, channels, size, size, device=args.device, requires_grad=True)
    calls = {mode: {i: partial(call, layers[i], x, mode == 'fwd_bwd', dtype, i != 'ours sdpa narrow-v')
                    for i in impls} for mode in ('fwd', 'fwd_bwd')}
    res: Dict[str, dict] = {i: dict(peak=None, errors=[]) for i in impls}  # the first error is the row's note
    for mode, fns in calls.items():
        times, errors = timed(fns, args)
        for i in impls:
            res[i][mode] = times[i] * 1e3 if i in times else None  # ms
            res[i]['errors'] += [f'{mode}: {errors[i]}'] if i in errors else []
    for i in impls if args.device.type == 'cuda' else ():  # the allocator's peak of one fwd+bwd above the start's
        layers[i].zero_grad(set_to_none=True)
        x.grad = None
        res[i]['peak'], error = attempt(partial(bench.peak_memory, calls['fwd_bwd'][i], args.device), args.device)
        res[i]['errors'] += [f'peak: {error}'] if error else []
    base = res['timm HaloAttn']
    return [dict(stage=stage, precision=precision, impl=i, fwd_ms=r['fwd'], fwd_bwd_ms=r['fwd_bwd'],
                 peak_mib=None if r['peak'] is None else r['peak'] / 2**20,
                 fwd_x_timm=_ratio(base['fwd'], r['fwd']), fwd_bwd_x_timm=_ratio(base['fwd_bwd'], r['fwd_bwd']),
                 mem_vs_timm=_ratio(r['peak'], base['peak']), note=(r['errors'] or [''])[0]) for i, r in res.items()]


LAYER_COLUMNS = ['stage', 'precision', 'impl', ('fwd ms', 'fwd_ms', '{:.2f}'), ('fwd+bwd ms', 'fwd_bwd_ms', '{:.2f}'),
                 ('peak MiB', 'peak_mib', '{:.0f}'), ('fwd x timm', 'fwd_x_timm', '{:.2f}x'),
                 ('fwd+bwd x timm', 'fwd_bwd_x_timm', '{:.2f}x'), ('memory / timm', 'mem_vs_timm', '{:.2f}x'), 'note']


# ---- the models --------------------------------------------------------------------------------------------------

KEYS = ('img_per_s', 'ms', 'gmac_per_s', 'first_call_s')  # a model row's figures, None until measured


def models_section(sec: Section, args, compiled: bool) -> None:
    """Per mode, each model's first call (a compile) written at once, then the ready ones timed (docs/benchmarks.md)."""
    batch, img, device = args.model_batch, args.img_size, args.device
    dry = compiled and args.quick  # a dry run compiles ours only, and traces its train step alone
    names = list(MODELS)[:1] if dry else list(MODELS)
    need = (5 if args.quick else 60) if compiled else 10  # seconds one model's first call may take
    gmacs = {name: attempt(partial(bench.model_gmacs, MODELS[name], img), device) for name in names}  # (GMACs, error)
    print(*(f'{name}: GMACs not counted: {e}\n' for name, (_, e) in gmacs.items() if e), end='', flush=True)
    x = torch.randn(batch, 3, img, img, device=device).to(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device=device)
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16)
    built: Dict[str, torch.nn.Module] = {}  # one copy per model for both modes: building costs seconds on CPU

    def first_call(name: str, train: bool, row: dict) -> Callable[[], None]:
        """The step of ``name`` in its mode, called once (what compiles it); the call's seconds go to ``row``."""
        if name not in built:
            torch.manual_seed(0)
            built[name] = MODELS[name]().to(device).to(memory_format=torch.channels_last)
        built[name].train(train).zero_grad(set_to_none=True)
        run = torch.compile(built[name], backend=args.compile_backend, dynamic=False) if compiled else built[name]
        fn = partial(bench._step, run, x, target if train else None, autocast)
        row['first_call_s'] = bench.interleaved_medians({name: fn}, repeats=1, warmup=0)[name]
        return fn

    for train in (True,) if dry else (True, False):
        fns, rows = {}, {}
        for name in names:
            row = rows[name] = dict(model=name, mode='train' if train else 'infer', variant='compiled' if compiled else
                                    'eager', gmacs=gmacs[name][0], note='', **dict.fromkeys(KEYS))
            left = args.deadline - time.monotonic()
            fn, row['note'] = attempt(partial(first_call, name, train, row), device) if left >= need else (
                None, f'skipped: time limit ({left:.0f} s left)')
            if fn:
                row['note'] = 'timing' if args.quick or args.deadline - time.monotonic() > 5 else 'skipped: time limit'
                fns.update({name: fn} if row['note'] == 'timing' else {})
            sec.add(row)
        # the dry run times the first call only: a CPU step costs seconds
        times, errors = ({n: rows[n]['first_call_s'] for n in fns}, {}) if args.quick else timed(fns, args)
        for name in fns:
            rows[name]['note'] = errors.get(name, 'first call (quick)' if args.quick else '')
            rows[name].update(dict(ms=times[name] * 1e3, img_per_s=batch / times[name]) if name in times else {})
        sec.write()
        del fns
        release(device)


def model_ratios(rows: List[dict]) -> None:
    """Each row's GMAC/s, and against timm's halonet_h1 (img/s) and resnet50 (GMAC/s) of the same mode and variant."""
    by = {(r['model'], r['mode'], r['variant']): r for r in rows}
    for r in rows:
        factor = bench.TRAIN_MACS_FACTOR if r['mode'] == 'train' else 1.0
        r['gmac_per_s'] = None if None in (r['gmacs'], r['img_per_s']) else r['gmacs'] * factor * r['img_per_s']
    for r in rows:
        timm_h1, r50 = (by.get((m, r['mode'], r['variant']), {}) for m in (TIMM, RESNET))
        r['x_timm_halonet'] = _ratio(r['img_per_s'], timm_h1.get('img_per_s'))
        r['gmac_per_s_pct_resnet50'] = _ratio(r['gmac_per_s'], r50.get('gmac_per_s'), 100)


MODEL_COLUMNS = ['model', 'mode', 'variant', ('img/s', 'img_per_s', '{:.0f}'), ('ms/step', 'ms', '{:.1f}'),
                 ('GMACs/img', 'gmacs', '{:.2f}'), ('GMAC/s', 'gmac_per_s', '{:.0f}'), ('x timm halonet_h1',
                 'x_timm_halonet', '{:.2f}x'), ('GMAC/s % of resnet50', 'gmac_per_s_pct_resnet50', '{:.0f}%'),
                 ('first call s', 'first_call_s', '{:.1f}'), 'note']


# ---- targets and the summary -------------------------------------------------------------------------------------

def targets(layer: List[dict], models: List[dict]) -> List[dict]:
    """The performance goals: measure, value, target ('>= 4x', '<= 0.3x', '>= 50%'), met, where it was measured."""
    def best(stage: str) -> dict:  # our fastest bf16 sdpa variant at a stage
        rows = [r for r in layer if r['stage'].startswith(stage + ' ') and r['precision'] == 'bf16' and
                r['impl'].startswith('ours sdpa') and r.get('fwd_bwd_x_timm') is not None]
        return max(rows, key=lambda r: r['fwd_bwd_x_timm'], default={})

    s1, s3 = best('stage1'), best('stage3')
    goals = [('layer fwd+bwd stage 1, bf16 (x timm)', s1.get('fwd_bwd_x_timm'), '>= 4x', s1.get('impl')),
             ('layer peak memory stage 1, bf16 (/ timm)', s1.get('mem_vs_timm'), '<= 0.3x', s1.get('impl')),
             ('layer fwd+bwd stage 3, bf16 (x timm)', s3.get('fwd_bwd_x_timm'), '>= 2x', s3.get('impl'))]
    for r, v in [(r, r['variant']) for r in models if r['model'] == OURS and r['mode'] == 'train']:
        goals += [(f'halonet_h1 train step, {v} (x timm halonet_h1)', r.get('x_timm_halonet'), '>= 3x', v),
                  (f'halonet_h1 train GMAC/s, {v} (% of resnet50)', r.get('gmac_per_s_pct_resnet50'), '>= 50%', v)]
    out = []
    for measure, value, target, where in goals:
        op, bound = target.split()
        met = value is not None and (value >= float(bound[:-1]) if op == '>=' else value <= float(bound[:-1]))
        shown = '-' if value is None else f'{value:.0f}%' if bound.endswith('%') else f'{value:.2f}x'
        out.append(dict(measure=measure, value=shown, target=target, met=met, where=where))
    return out


def summary(out_dir: str) -> int:
    """gpu.md / gpu.json from the sections' files: environment, status of each, their tables, the targets."""
    out, found = Path(out_dir), {}
    for name in ('tests',) + SECTIONS:
        with contextlib.suppress(OSError, ValueError):
            found[name] = json.loads((out / f'{name}.json').read_text())
    # the budget is each section's own
    meta = {k: v for k, v in next((d['meta'] for d in found.values() if d.get('meta')), {}).items() if k != 'budget_s'}
    status = table(['section', 'status', ('s', 's', '{:.0f}'), 'rows', 'error'], [
        dict(section=n, status=d.get('status'), s=d.get('wall_s', d.get('seconds')), rows=len(d.get('rows') or []),
             error=d.get('error') or '') for n, d in found.items()])
    models = [r for n in ('models_eager', 'models_compiled') for r in found.get(n, {}).get('rows', []) if 'model' in r]
    goals = targets(found.get('layer', {}).get('rows', []), models)
    columns = ['measure', 'value', 'target', ('met', 'met', yes_no), ('best variant', 'where', '{}')]
    parts = ['# GPU check\n', '\n'.join(f'- {k}: {v}' for k, v in meta.items()) + '\n', status + '\n',
             *[(out / f'{name}.md').read_text() for name in found], '## Performance goals\n\n' + table(columns, goals)]
    write_atomic(out / 'gpu.md', '\n'.join(parts) + '\n')
    write_atomic(out / 'gpu.json', json.dumps(dict(meta=meta, sections=found, targets=goals), indent=1, default=str))
    return 0


# ---- main --------------------------------------------------------------------------------------------------------

def run_section(name: str, args) -> bool:
    """One section, its files written as it goes; any error (not only out-of-memory) is recorded in them."""
    args.deadline = time.monotonic() + args.budget
    compiled, medians_of = name == 'models_compiled', f'medians of {args.repeats}'
    how = f'torch.compile, backend {args.compile_backend}' if compiled else 'eager'
    title, columns, run = dict(
        layer=(f'Layer vs timm HaloAttn (batch {args.layer_batch}, {medians_of})', LAYER_COLUMNS, layer_section),
        sdpa=(f'SDPA calls and backends (batch {args.layer_batch})', SDPA_COLUMNS, sdpa_section),
    ).get(name) or (f'Models, {how} (batch {args.model_batch}, {args.img_size} px, bf16 autocast, channels-last, '
                    f'{medians_of})', MODEL_COLUMNS, partial(models_section, compiled=compiled))
    sec = Section(name, title, args, columns, model_ratios if columns is MODEL_COLUMNS else None)
    try:
        run(sec, args)
        sec.status = 'ok'
    except Exception as e:  # recorded, and the next section still runs
        sec.status, sec.error = 'failed', short_error(e)
        sec.trace = ''.join(traceback.format_exception(type(e), e, e.__traceback__)[-12:])
    print('\n' + sec.write(), flush=True)
    return sec.status == 'ok'


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add('--section', default=','.join(SECTIONS), help=f'comma-separated, of {",".join(SECTIONS)}')
    add('--summary', action='store_true', help='only gather the sections\' files into gpu.md/json')
    add('--device', default='cuda', help='cuda (default) or cpu (a dry run with --quick)')
    add('--quick', action='store_true', help='tiny sizes, one sample: checks the script runs')
    add('--out', default=None, help='output folder (default: $OUT, else benchmarks/out/gpu)')
    add('--budget', type=float, default=420.0, help='seconds for each section; what would not fit is skipped')
    args = parser.parse_args(argv)
    args.out = args.out or os.environ.get('OUT') or os.path.join('benchmarks', 'out', 'gpu')
    if args.summary:
        return summary(args.out)
    names = [s for s in args.section.split(',') if s]
    if unknown := set(names) - set(SECTIONS):
        parser.error(f'unknown section(s) {sorted(unknown)}; known: {", ".join(SECTIONS)}')
    args.device, quick = torch.device(args.device), args.quick
    if args.device.type == 'cuda' and not torch.cuda.is_available():
        parser.exit(2, 'no CUDA device: run with --device cpu --quick for a dry run\n')
    args.layer_batch, args.model_batch, args.repeats, args.warmup = (2, 1, 1, 0) if quick else (64, 128, 10, 3)
    args.img_size = 256  # timm's halonet_h1 needs every stage's map divisible by its block size 8
    # dynamo's tracing without code generation: what a CPU dry run can afford
    args.compile_backend = 'eager' if quick and args.device.type == 'cpu' else 'inductor'
    # the dry run: stage 1 (maps of several blocks) and stage 4 (one block), the two shapes of the code path
    sizes = {k: (c, max(8, s // 4)) for k, (c, s) in STAGES.items() if k in ('stage1', 'stage4')} if quick else STAGES
    args.stages = {f'{k} C{c} {s}x{s}': (c, s) for k, (c, s) in sizes.items()}
    keys = ('layer_batch', 'model_batch', 'img_size', 'repeats', 'compile_backend')
    args.meta = dict(environment(args), **{k: getattr(args, k) for k in keys}, budget_s=args.budget)
    ok = [run_section(name, args) for name in names]
    if len(names) > 1:
        summary(args.out)
    return 0 if all(ok) else 1


if __name__ == '__main__':
    sys.exit(main())
