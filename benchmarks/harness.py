"""Measurement harness: interleaved medians, CPU peak-RSS in a child process, CUDA allocator peaks."""
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch


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
