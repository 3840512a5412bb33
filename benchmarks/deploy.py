"""Deployment speed: halonet_h1 inference in PyTorch eager, torch.compile and ONNX Runtime (docs/benchmarks.md)."""
import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import timm
import torch

from benchmarks.model import MODELS, OURS, RESNET, TIMM
from timm_halo.bench import TUNED_MALLOC, busy_load, interleaved_medians, model_gmacs, table, write_json
from timm_halo.export import export_onnx, onnx_parity

CONTENDERS: Dict[str, Callable[[], torch.nn.Module]] = dict(MODELS)
EAGER, COMPILE, ORT = 'eager', 'compile', 'ort'
# PyTorch timed under glibc's malloc defaults and with bench.TUNED_MALLOC (freed memory kept for reuse)
MALLOCS = ('default', 'tuned')
# Deployment goals, ratios in the same run: (measure, how to read the row, target).
TARGETS = ('eager batch 1 vs timm >= 3x', 'eager batch 1 GMAC/s vs resnet50 >= 50%', 'ORT batch 1 vs timm >= 3x',
           'ours in ORT / ours eager (ms) <= 1.3x')


def ort_session(path: str, threads: int, profile_prefix: Optional[str] = None, spin: bool = True) -> Any:
    """A CPU-EP session with ORT's default graph optimizations and spinning, and torch's thread count."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    # Spinning worker threads (ORT's default) keep busy after run() returns and take the cores from whatever runs
    # next in the process (measured: a 2.2 ms eager layer call took 6.8 ms right after an ORT call with spinning,
    # 2.0 ms without); measure() gives each ORT model a process of its own.
    options.add_session_config_entry('session.intra_op.allow_spinning', '1' if spin else '0')
    if profile_prefix:
        options.enable_profiling, options.profile_file_prefix = True, profile_prefix
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def _run_eager(model: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        model(x)


_CALLS: Dict[Tuple[str, str, int], Callable[[], Any]] = {}  # a worker process's timed calls, set up once
SETTLE_S = 0.5  # between workers: the last one's OpenMP or ORT threads stop spinning and give the cores back


def _input(batch: int, img_size: int) -> torch.Tensor:
    return torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(2))


def _setup_torch(contenders: Dict[str, Callable[[], torch.nn.Module]], batch_sizes: Sequence[int], img_size: int,
                 threads: int, compile_: bool, warmup: int) -> None:
    """This worker's PyTorch calls per (backend, model, batch): eager, and compiled if asked."""
    torch.set_num_threads(threads)
    for label, factory in contenders.items():
        torch.manual_seed(0)
        model = factory().eval()
        # One compiled module per model for every batch size: a second batch size recompiles in the warm-up.
        runs = {EAGER: model, **({COMPILE: torch.compile(model)} if compile_ else {})}
        for batch in batch_sizes:
            x = _input(batch, img_size)
            _CALLS.update({(backend, label, batch): partial(_run_eager, m, x) for backend, m in runs.items()})
    _warm_up(max(warmup, 1) if compile_ else warmup)  # torch.compile's (slow) first call is not timed


def _setup_ort(paths: Dict[str, str], batch_sizes: Sequence[int], img_size: int, threads: int, spin: bool,
               warmup: int) -> None:
    """This worker's ONNX Runtime calls per (backend, model, batch)."""
    for label, path in paths.items():
        session = ort_session(path, threads, spin=spin)
        for batch in batch_sizes:
            _CALLS[ORT, label, batch] = partial(session.run, None, {'input': _input(batch, img_size).numpy()})
    _warm_up(warmup)


def _warm_up(rounds: int) -> None:
    for _ in range(rounds):
        for fn in _CALLS.values():
            fn()


def _time_round() -> Dict[Tuple[str, str, int], float]:
    """Seconds of one call of each of this worker's calls, round-robin."""
    return interleaved_medians(_CALLS, repeats=1, warmup=0)


@contextlib.contextmanager
def _worker(env: Dict[str, Optional[str]]) -> Iterator[Any]:
    """A spawned worker process (a pool of one) whose environment has ``env`` set (None: removed) at its start."""
    saved = dict(os.environ)
    for key, value in env.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    try:
        pool = multiprocessing.get_context('spawn').Pool(1)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    with pool:
        yield pool


def measure(batch_sizes: Sequence[int], img_size: int, repeats: int, warmup: int, backends: Sequence[str],
            onnx_dir: Path, load: int = 0, ort_spin: bool = True,
            mallocs: Sequence[str] = MALLOCS) -> Tuple[List[dict], Dict[str, dict]]:
    """Rows (backend, malloc, model, batch, seconds, GMACs) of every contender: medians of ``repeats`` rounds."""
    # Each backend and malloc setting runs in a worker process of its own, set up once; a round asks each worker in
    # turn for one call of each of its contenders, so drift hits all alike. In one process, glibc's heap after earlier
    # work (an ONNX export) changed timm's eager batch-1 time from 261 to 140 ms, and ATen's OpenMP threads spinning
    # after an eager call slowed ORT (ours: 103 ms alone, 131 ms interleaved). ORT allocates from its own arena: under
    # glibc's defaults, one worker per model, as a deployment runs it (ORT's spinning threads, on by default, would
    # take the cores from the next model's call in a shared one).
    gmacs = {label: model_gmacs(factory, img_size) for label, factory in CONTENDERS.items()}
    exported = {}  # each model exported with a dynamic batch, and its ORT-vs-eager max abs diff at batch 1
    for label, factory in CONTENDERS.items() if ORT in backends else ():
        torch.manual_seed(0)
        model, path = factory().eval(), onnx_dir / f"{label.replace(' ', '_')}.onnx"
        # example batch 2: no size-1 specialisation in the graph
        export_onnx(model, path, torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)))
        check = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
        exported[label] = dict(path=str(path), max_abs_diff=onnx_parity(path, model, [check]).max_abs_diff)
    threads, samples = torch.get_num_threads(), defaultdict(list)
    with contextlib.ExitStack() as stack, busy_load(load):
        workers = {}
        for malloc in mallocs:
            workers[malloc] = stack.enter_context(_worker(TUNED_MALLOC if malloc == 'tuned' else
                                                          dict.fromkeys(TUNED_MALLOC)))
            workers[malloc].apply(_setup_torch, (CONTENDERS, batch_sizes, img_size, threads, COMPILE in backends,
                                                 warmup))
        for label, e in exported.items():
            workers[ORT, label] = stack.enter_context(_worker(dict.fromkeys(TUNED_MALLOC)))
            workers[ORT, label].apply(_setup_ort, ({label: e['path']}, batch_sizes, img_size, threads, ort_spin,
                                                   warmup))
        for _ in range(repeats):
            for name, pool in workers.items():
                time.sleep(SETTLE_S)
                for key, t in pool.apply(_time_round).items():
                    samples[key, 'default' if key[0] == ORT else name].append(t)
    rows = [dict(backend=backend, malloc=malloc, model=label, batch=batch, seconds=statistics.median(ts))
            for ((backend, label, batch), malloc), ts in sorted(samples.items(), key=lambda kv: kv[0][0][2])]
    for r in rows:
        s, batch, label = r['seconds'], r['batch'], r['model']
        r.update(gmacs=gmacs[label], ms=s * 1e3, img_per_s=batch / s, gmac_per_s=gmacs[label] * batch / s)
    return add_ratios(rows), exported


def add_ratios(rows: List[dict]) -> List[dict]:
    """Speed vs timm's halonet_h1 and resnet50 (same backend, malloc and batch), GMAC/s % of resnet50's, ms vs
    eager (same malloc)."""
    by_key = {(r['backend'], r['malloc'], r['model'], r['batch']): r for r in rows}
    for r in rows:
        timm_h1, r50 = (by_key.get((r['backend'], r['malloc'], peer, r['batch'])) for peer in (TIMM, RESNET))
        eager = by_key.get((EAGER, r['malloc'], r['model'], r['batch']))
        r['vs_timm'] = timm_h1['seconds'] / r['seconds'] if timm_h1 else None
        r['vs_resnet50'] = r50['seconds'] / r['seconds'] if r50 else None
        r['gmac_per_s_pct_resnet50'] = 100.0 * r['gmac_per_s'] / r50['gmac_per_s'] if r50 else None
        r['ms_vs_eager'] = r['seconds'] / eager['seconds'] if eager else None
    return rows


COLUMNS = ['backend', 'malloc', 'model', ('ms', 'ms', '{:.1f}'), ('img/s', 'img_per_s', '{:.2f}'),
           ('GMAC/s', 'gmac_per_s', '{:.1f}'), ('vs timm halonet_h1', 'vs_timm', '{:.2f}x'),
           ('vs resnet50', 'vs_resnet50', '{:.2f}x'), ('GMAC/s % of resnet50', 'gmac_per_s_pct_resnet50', '{:.0f}%'),
           ('ms / eager', 'ms_vs_eager', '{:.2f}x')]


def format_tables(rows: List[dict]) -> str:
    """One markdown table per batch size."""
    return '\n'.join(f'\nbatch {batch}\n' + table(COLUMNS, [r for r in rows if r['batch'] == batch])
                     for batch in dict.fromkeys(r['batch'] for r in rows))


def target_rows(rows: List[dict]) -> List[dict]:
    """The four deployment goals, read off this run (batch 1), once per malloc setting of the eager timings."""
    ours = {(r['backend'], r['malloc']): r for r in rows if r['model'] == OURS and r['batch'] == 1}
    ort, targets = ours.get((ORT, 'default'), {}), []
    for (backend, malloc), eager in ours.items():
        if backend == EAGER:
            values = [eager['vs_timm'], eager['gmac_per_s_pct_resnet50'], ort.get('vs_timm'),
                      ort['seconds'] / eager['seconds'] if ort else None]
            targets += [dict(target=t, malloc=malloc, value=v) for t, v in zip(TARGETS, values)]
    return targets


def profile_ort(path: str, img_size: int, runs: int, top: int = 12) -> dict:
    """ORT's own profile of ``runs`` batch-1 calls: summed node time per op type, and the slowest nodes."""
    session = ort_session(path, torch.get_num_threads(), os.path.join(tempfile.mkdtemp(prefix='ort_profile_'), 'ours'))
    feed = {'input': torch.randn(1, 3, img_size, img_size).numpy()}
    for _ in range(runs + 1):  # the first is a warm-up, dropped below
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs_seen = sorted((e for e in events if e.get('name') == 'model_run'), key=lambda e: e['ts'])
    warm_end = runs_seen[0]['ts'] + runs_seen[0]['dur']  # the warm-up run's nodes are left out
    per_type, per_node = Counter(), Counter()  # microseconds summed over the runs
    for e in events:
        if e.get('cat') == 'Node' and e['name'].endswith('_kernel_time') and e['ts'] >= warm_end:
            op = e.get('args', {}).get('op_name', '?')
            per_type[op] += e['dur']
            per_node[(e['name'][:-len('_kernel_time')], op)] += e['dur']
    scale, total = 1e-3 / runs, sum(per_type.values())  # -> ms per run
    timed = sorted(e['dur'] / 1e3 for e in runs_seen[1:])
    return dict(runs=runs, model_run_ms=timed[len(timed) // 2], node_ms=total * scale,
                op_types=[dict(op=op, ms=t * scale, pct=100.0 * t / total) for op, t in per_type.most_common()],
                nodes=[dict(node=n, op=op, ms=t * scale) for (n, op), t in per_node.most_common(top)])


def format_profile(prof: dict) -> str:
    return (f"\nORT profile, ours at batch 1 ({prof['runs']} runs): median model_run {prof['model_run_ms']:.1f} ms, "
            f"node time {prof['node_ms']:.1f} ms per run\n"
            + table([('op type', 'op', '{}'), ('ms per run', 'ms', '{:.1f}'), ('share', 'pct', '{:.1f}%')],
                    [r for r in prof['op_types'] if r['pct'] >= 0.5])
            + '\n\nslowest nodes\n' + table(['node', 'op', ('ms per run', 'ms', '{:.2f}')], prof['nodes']))


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add('--batch-sizes', type=int, nargs='+', default=[1, 8])
    add('--img-size', type=int, default=256)
    add('--repeats', type=int, default=5, help='timed rounds (default 5)')
    add('--warmup', type=int, default=1, help='untimed rounds first (default 1)')
    add('--compile', action='store_true', help='also torch.compile (inductor) every model: minutes on 2 cores')
    add('--no-onnx', action='store_true', help='skip the ONNX export and ONNX Runtime')
    add('--threads', type=int, default=None, help="torch.set_num_threads, and ORT's intra-op threads")
    add('--load', type=int, default=0, metavar='N', help='N busy-loop processes during the timings (as model.py)')
    add('--json', metavar='PATH', help='also write the results as JSON')
    add('--onnx-dir', metavar='DIR', help='keep the exported .onnx files here (default: a temporary folder)')
    add('--ort-no-spin', dest='ort_spin', action='store_false',
        help="turn ORT's spinning worker threads off (on by default, as in ORT; each ORT model has its own process)")
    add('--malloc', choices=[*MALLOCS, 'both'], default='both',
        help="PyTorch's timings under glibc's malloc defaults, with freed memory kept for reuse, or both (default)")
    add('--ort-profile', type=int, default=0, metavar='N', help="ORT's profiler on ours at batch 1, N runs")
    add('--quick', action='store_true', help='batch 1, one round, no warm-up (for the tests)')
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.repeats, args.warmup = [1], 1, 0
    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error('--batch-sizes and --repeats must be >= 1, --warmup >= 0')
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = [EAGER] + ([COMPILE] if args.compile else []) + ([] if args.no_onnx else [ORT])
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = Path(args.onnx_dir or tmp)
        onnx_dir.mkdir(parents=True, exist_ok=True)
        rows, exported = measure(args.batch_sizes, args.img_size, args.repeats, args.warmup, backends, onnx_dir,
                                 args.load, args.ort_spin,
                                 MALLOCS if args.malloc == 'both' else [args.malloc])
        prof = profile_ort(exported[OURS]['path'], args.img_size, args.ort_profile) if (
            args.ort_profile and OURS in exported) else None
    cpu = platform.processor() or platform.machine()
    quiet = f'{args.load} busy-loop process(es)' if args.load else 'quiet'
    header = (f'Deployment, halonet_h1 @{args.img_size}, {args.repeats} repeats | cpu ({cpu}, '
              f'{torch.get_num_threads()} threads; ORT intra-op threads the same, one process per ORT model, '
              f'spinning {"on" if args.ort_spin else "off"}) | torch {torch.__version__} '
              f'| timm {timm.__version__} | fp32, inference_mode | {quiet} | each backend and malloc setting in a '
              f'worker process (tuned: {", ".join(f"{k}={v}" for k, v in TUNED_MALLOC.items())}) | medians of '
              f'rounds interleaved across the workers')
    print(f'{header}\n{format_tables(rows)}')
    if exported:
        print('\nONNX Runtime vs eager, max |diff| at batch 1: ' + ', '.join(
            f"{k} {v['max_abs_diff']:.2g}" for k, v in exported.items()))
    targets = target_rows(rows)
    print('\ndeployment goals (batch 1, this run)\n' + '\n'.join(
        f"  {t['target']}, {t['malloc']} malloc: {'-' if t['value'] is None else format(t['value'], '.2f')}"
        for t in targets))
    if prof:
        print(format_profile(prof))
    write_json(dict(benchmark='deploy', header=header, args=vars(args), rows=rows, onnx=exported, targets=targets,
                    ort_profile=prof), args.json)


if __name__ == '__main__':
    main()
