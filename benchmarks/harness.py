"""Measurement harness: interleaved medians, CPU peak-RSS in a child process, CUDA allocator peaks."""
import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

# The timing loop lives in the package so that `timm-halo bench` (installed without this folder) shares it.
from timm_halo.bench import AMP_DTYPES, interleaved_medians

__all__ = ['add_model_run_args', 'add_output_args', 'apply_threads', 'busy_load', 'interleaved_medians', 'peak_memory',
           'peak_memory_in_child', 'write_outputs']


def peak_memory_in_child(module: str, args: List[str]) -> int:
    """Run ``python -m module --measure-memory ARGS`` in a fresh process; it prints {"peak_bytes": N} last.

    The child runs with glibc's mmap threshold fixed at 64 KiB: by default glibc raises the threshold after
    large frees and keeps later tensors on its heap, so a call's allocations may reuse freed memory and its
    RSS peak reads low. Fixed, every large tensor is mapped on allocation and returned on free. That costs
    page faults, which is why timings run in the parent, with the default allocator.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536')
    out = subprocess.run([sys.executable, '-m', module, '--measure-memory', *args],
                         check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])['peak_bytes']


def _read_status_kib(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field} not found in /proc/self/status')


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak extra memory of one call, in bytes: the CUDA allocator's peak, or on CPU the peak RSS growth.

    On CPU the process's high-water mark (VmHWM) is reset first through /proc/self/clear_refs (Linux >= 4.0),
    so earlier allocations, e.g. while importing torch, don't hide the call's own peak.
    """
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    gc.collect()
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # reset the peak resident set size to the current one
    base = _read_status_kib('VmRSS')
    fn()
    return max(_read_status_kib('VmHWM') - base, 0) * 1024


def add_model_run_args(parser: argparse.ArgumentParser, cpu_batch_size: int) -> None:
    """The options of a whole-model timing run: device, batch size, repeats, warm-up, AMP, channels-last, compile."""
    parser.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    parser.add_argument('--batch-size', type=int, default=None, help=f'default: 8 on cuda, {cpu_batch_size} on cpu')
    parser.add_argument('--repeats', type=int, default=None, help='timed rounds (default: 20 on cuda, 5 on cpu)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed rounds first (default: 1)')
    parser.add_argument('--amp', nargs='?', const='bf16', choices=sorted(AMP_DTYPES), default=None,
                        help='autocast: bf16 (default; cpu and cuda) or fp16 (cuda only)')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--compile', action='store_true', help='torch.compile every model (slow on cpu)')


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """``--threads N``, ``--json PATH`` and ``--plot PATH`` (PNG; needs matplotlib, imported only then)."""
    # On a shared 2-core machine two OpenMP threads wait on each other whenever a neighbour takes a core;
    # --threads 1 then gives steadier (and often faster) figures.
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch\'s own)')
    parser.add_argument('--json', metavar='PATH', help='also write the results as JSON (for benchmarks.plot)')
    parser.add_argument('--plot', metavar='PATH', help='also draw the results as a PNG (needs matplotlib)')
    parser.add_argument('--load', type=int, default=0, metavar='N',
                        help='N busy-loop processes run during the timings (a shared machine); default 0')


@contextlib.contextmanager
def busy_load(processes: int) -> Iterator[None]:
    """``processes`` busy-loop processes for the duration: what DataLoader workers, a second job or a CPU quota
    do to a shared machine. Started before and stopped after the timed block."""
    procs = [subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in range(processes)]
    try:
        time.sleep(0.5 if procs else 0)  # let the scheduler spread them
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def apply_threads(threads: Optional[int]) -> None:
    """Set torch's CPU threads (if given) and say so when the machine is already busy before we start."""
    if threads:
        torch.set_num_threads(threads)
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores / 2:
        # Interleaving keeps the ratios fair, but several threads that wait on each other at every parallel
        # region can slow down by 10x when a neighbour takes a core: medians of such a run are not figures.
        print(f'note: load average {load:.1f} on {cores} cores before starting: expect noisy figures'
              + ('' if torch.get_num_threads() == 1 else '; --threads 1 is steadier on a shared machine'))


def write_outputs(data: Dict[str, Any], json_path: Optional[str], plot_path: Optional[str]) -> None:
    """Write ``data`` ({'benchmark': name, 'header': str, 'rows': [...], ...}) as JSON and/or a PNG plot."""
    if json_path:
        with open(json_path, 'w') as f:
            json.dump(data, f, indent=1)
        print(f'wrote {json_path}')
    if plot_path:
        from benchmarks.plot import plot  # matplotlib stays optional: imported only when a plot is asked for

        plot(data, plot_path)
        print(f'wrote {plot_path}')
