"""Runs the tiles of a CPU kernel on persistent daemon worker threads, one intra-op thread each; a call never returns
or raises while one of its tiles can run (docs/kernels.md, Worker threads)."""
import os
import queue
import threading
from typing import Callable, List, Optional

import torch

__all__ = ['run_tiles']


class _Pool:
    """Daemon worker threads of one process, fed by one queue of jobs."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.workers: List[threading.Thread] = []

    def _work(self, ready: threading.Event) -> None:
        torch.set_num_threads(1)
        ready.set()
        while True:
            self.jobs.get()()  # jobs catch their own errors (_Call.runner)

    def ensure(self, count: int) -> None:
        """At least ``count`` workers, each single-threaded before it takes a job."""
        with self.lock:
            if len(self.workers) >= count:
                return
            caller_threads = torch.get_num_threads()
            started = []
            while len(self.workers) < count:
                ready = threading.Event()
                worker = threading.Thread(target=self._work, args=(ready,), daemon=True,
                                          name=f'timm_halo_tiles_{len(self.workers)}')
                worker.start()
                self.workers.append(worker)
                started.append(ready)
            interrupted = _wait_all(started)  # workers start in microseconds; a Ctrl-C waits for them
            torch.set_num_threads(caller_threads)  # the caller's count stays the process-wide default
            if interrupted is not None:
                raise interrupted


def _wait_all(events: List[threading.Event],
              on_interrupt: Callable[[], None] = lambda: None) -> Optional[BaseException]:
    """Wait until every event is set, even through KeyboardInterrupt (then calling ``on_interrupt``); returns the
    first interruption, for the caller to re-raise once it is safe."""
    interrupted = None
    for event in events:
        while True:
            try:
                event.wait()
                break
            except BaseException as e:  # noqa: B036 - re-raised by the caller
                on_interrupt()
                interrupted = interrupted or e
    return interrupted


_pool = _Pool()
_pool_lock = threading.Lock()


def _current_pool() -> _Pool:
    global _pool
    with _pool_lock:
        if _pool.pid != os.getpid():  # a forked child: the parent's workers do not exist here
            _pool = _Pool()
        return _pool


class _Call:
    """One ``run_tiles`` call: its tiles, the runners taking them, the first error."""

    def __init__(self, fn: Callable[[int, int], None], n: int, tile: int, runners: int) -> None:
        self.fn, self.n, self.tile, self.running = fn, n, tile, runners
        self.lock, self.finished, self.next, self.stopped = threading.Lock(), threading.Event(), 0, False
        self.error: Optional[BaseException] = None

    def _take(self) -> int:
        with self.lock:
            if self.stopped or self.next >= self.n:
                return -1
            start, self.next = self.next, self.next + self.tile
            return start

    def stop(self, error: Optional[BaseException] = None) -> None:
        with self.lock:
            self.stopped = True
            if error is not None and self.error is None:
                self.error = error

    def runner(self) -> None:
        try:
            with torch.no_grad():
                while (start := self._take()) >= 0:
                    self.fn(start, min(start + self.tile, self.n))
        except BaseException as e:  # noqa: B036 - handed to the caller, which re-raises it
            self.stop(e)
        finally:
            with self.lock:
                self.running -= 1
                if self.running == 0:
                    self.finished.set()

    def wait(self) -> None:
        """Until no runner can touch the call's buffers; then the first error (a tile's or the caller's own
        KeyboardInterrupt) is raised."""
        interrupted = _wait_all([self.finished], self.stop)  # Ctrl-C: no new tiles, the running ones end
        if interrupted is not None or self.error is not None:
            raise interrupted or self.error


def run_tiles(fn: Callable[[int, int], None], n: int, tile: int, caller_runs: bool = False) -> None:
    """Call ``fn(start, stop)`` for consecutive tiles of ``range(n)`` (writing disjoint outputs): inline on one
    intra-op thread or one tile, else on the workers. ``caller_runs``: the caller is one of the runners (saves a
    worker's wake-up, about 0.5 ms a call; only for an ``fn`` that runs no intra-op parallel ATen ops)."""
    threads = torch.get_num_threads()
    tiles = -(-n // tile)
    if threads <= 1 or tiles <= 1:
        for start in range(0, n, tile):
            fn(start, min(start + tile, n))
        return
    runners = min(threads, tiles)
    pool = _current_pool()
    pool.ensure(runners - caller_runs)
    call = _Call(fn, n, tile, runners)
    for _ in range(runners - caller_runs):
        pool.jobs.put(call.runner)
    if caller_runs:
        call.runner()  # catches its own errors and a Ctrl-C between tiles: wait() re-raises them
    call.wait()
