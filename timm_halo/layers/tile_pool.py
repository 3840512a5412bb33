"""Runs the tiles of a CPU kernel on persistent worker threads, one intra-op thread each.

Why: a tile loop whose every small op is an intra-op parallel region (an OpenMP team with a barrier) collapses when
a core is shared with another process (DataLoader workers, a second job, a CPU quota): each barrier waits for the
descheduled thread's next time slice, thousands of times per step. Here each tile is one task for one worker that
runs its ops single-threaded, tasks are handed out from a queue (a slowed worker simply takes fewer), and the only
barrier is the end of the call.

The workers take as many threads as the caller's ``torch.get_num_threads()``. Each worker sets its own intra-op
thread count to 1, which is thread-local for OpenMP and MKL; the caller's count is then written back, so the
process-wide default seen by later threads stays the user's. Grad mode and autocast are thread-local too: the tasks
run under ``no_grad`` on plain tensors, with explicit dtypes. After ``fork`` (DataLoader workers) the child starts a
pool of its own.
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch

__all__ = ['run_tiles']

_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None
_pool_threads = 0


def _single_threaded_worker(ready: threading.Barrier) -> None:
    torch.set_num_threads(1)
    ready.wait()


def _get_pool(threads: int) -> ThreadPoolExecutor:
    global _pool, _pool_threads
    with _lock:
        if _pool is None or _pool_threads != threads:
            if _pool is not None:
                _pool.shutdown(wait=False)
            ready = threading.Barrier(threads + 1)
            _pool = ThreadPoolExecutor(threads, thread_name_prefix='timm_halo_tiles',
                                       initializer=_single_threaded_worker, initargs=(ready,))
            for _ in range(threads):  # start every worker now, so that all have set their thread count
                _pool.submit(int)
            ready.wait()
            torch.set_num_threads(threads)  # write the caller's count back as the process-wide default
            _pool_threads = threads
        return _pool


def _forget_pool_in_child() -> None:
    global _pool, _pool_threads
    _pool, _pool_threads = None, 0


os.register_at_fork(after_in_child=_forget_pool_in_child)


def _no_grad_task(fn: Callable[[int, int], None], start: int, stop: int) -> None:
    with torch.no_grad():
        fn(start, stop)


def run_tiles(fn: Callable[[int, int], None], n: int, tile: int) -> None:
    """Call ``fn(start, stop)`` for consecutive tiles of ``range(n)``: inline when the caller runs one intra-op
    thread (or there is one tile), else on the worker threads. ``fn`` must write disjoint outputs per tile."""
    threads = torch.get_num_threads()
    starts = range(0, n, tile)
    if threads <= 1 or len(starts) <= 1:
        for start in starts:
            fn(start, min(start + tile, n))
        return
    pool = _get_pool(threads)
    futures = [pool.submit(_no_grad_task, fn, start, min(start + tile, n)) for start in starts]
    for future in futures:
        future.result()  # re-raises a task's exception here
