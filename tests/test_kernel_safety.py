"""The fused C kernel's build, cache and worker threads (layers/fused_cpu.py, tile_pool.py) never take the process
down: damaged or planted cache files, Ctrl-C mid-kernel, concurrent callers with different thread counts, odd
settings; and CPUs where the kernel cannot pay off (aarch64, x86-64 without AVX2, Windows, macOS) never compile it.

Where a crash or a hang is the failure mode, the case runs in a child interpreter.
"""
import logging
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from timm_halo.layers import HaloAttention, fused_cpu, tile_pool

needs_compiler = pytest.mark.skipif(not fused_cpu.available(), reason=f'no C kernel: {fused_cpu.unavailable_reason()}')
wide_cpu = pytest.mark.skipif(fused_cpu.target()[0] == 'baseline', reason='no AVX2 / AVX-512: the kernel is not built')

# A child's check: the layer's 'auto' forward equals the dense reference; prints the kernel 'auto' ran
CHECK_LAYER = """
import torch
from timm_halo.layers import HaloAttention, fused_cpu
layer = HaloAttention(16, block_size=4, halo_size=1, heads=2, dim_head=8).double()
x = torch.randn(2, 16, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
torch.testing.assert_close(layer(x), layer.reference_forward(x))
print(layer._call_plan(x)[0], fused_cpu.unavailable_reason() or 'ok')
"""


def _child(code: str, cache: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    child_env = {**os.environ, fused_cpu.CACHE_ENV: str(cache), **env}
    child_env.pop('TIMM_HALO_ATTN_IMPL', None)
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=child_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """The kernel as on a first use in this process: no library loaded yet, an empty cache in tmp_path."""
    monkeypatch.setattr(fused_cpu, '_libs', None)
    monkeypatch.setattr(fused_cpu, '_error', None)
    monkeypatch.setenv(fused_cpu.CACHE_ENV, str(tmp_path / 'cache'))
    monkeypatch.delenv('TIMM_HALO_ATTN_IMPL', raising=False)
    return tmp_path / 'cache'


def _new_process():
    """What a later process would see: nothing loaded, the same cache."""
    fused_cpu._libs, fused_cpu._error = None, None


def _warnings(caplog):
    return [r for r in caplog.records if r.name.startswith('timm_halo') and r.levelno == logging.WARNING]


def _mapped(folder: Path) -> list:
    return [line for line in Path('/proc/self/maps').read_text().splitlines() if str(folder) in line]


# ---- A: the cache holds only what a build here wrote -----------------------------------------------------------

def _damage(library: Path, how: str, tmp_path: Path) -> None:
    data = library.read_bytes()
    if how == 'truncated':
        library.write_bytes(data[:len(data) // 2])
    elif how == 'zeroed':
        library.write_bytes(data[:len(data) // 4] + bytes(len(data) // 4) + data[len(data) // 2:])
    elif how == 'double_over_float':
        library.write_bytes(next(library.parent.glob('fused_cpu_double_*.so')).read_bytes())
    else:  # a foreign library under the kernel's name
        source = tmp_path / 'foreign.c'
        source.write_text('int something_else(void) { return 1; }\n')
        subprocess.run(['cc', '-shared', '-fPIC', str(source), '-o', str(library)], check=True)


@needs_compiler
@wide_cpu
@pytest.mark.heavy
@pytest.mark.parametrize('how', ['truncated', 'zeroed', 'double_over_float', 'foreign'])
def test_damaged_cached_library_is_rebuilt_not_loaded(fresh_build, tmp_path, how):
    assert fused_cpu.available()
    library = next(fresh_build.glob('fused_cpu_float_*.so'))
    _damage(library, how, tmp_path)
    damaged = library.read_bytes()
    done = _child(CHECK_LAYER, fresh_build)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ['fused', 'ok']
    assert library.read_bytes() != damaged and fused_cpu._matches(library, Path(f'{library}.sha256'))  # rebuilt


@needs_compiler
def test_relative_cache_path_is_used_absolutely(fresh_build, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(fused_cpu.CACHE_ENV, '.')
    assert fused_cpu.available()
    assert sorted(p.name.split('_')[2] for p in tmp_path.glob('fused_cpu_*.so')) == ['double', 'float']
    if Path('/proc/self/maps').exists():
        assert _mapped(tmp_path)  # loaded from there, not looked up on the library path


@needs_compiler
def test_cache_folder_is_private_and_library_reused(fresh_build):
    assert fused_cpu.available()
    assert stat.S_IMODE(fresh_build.stat().st_mode) == 0o700
    built = {p.name: p.stat().st_mtime_ns for p in fresh_build.iterdir()}
    assert sorted(name.rsplit('.', 1)[-1] for name in built) == ['sha256', 'sha256', 'so', 'so']  # no leftovers
    isa = fused_cpu.target()[0]
    assert all(f'_{isa}_' in name for name in built)  # the name says which instruction set the build targets
    _new_process()
    assert fused_cpu.available()
    assert {p.name: p.stat().st_mtime_ns for p in fresh_build.iterdir()} == built


# ---- G: nobody else can plant a library ---------------------------------------------------------------------

@needs_compiler
@pytest.mark.skipif(os.name == 'nt' or not Path('/proc/self/maps').exists(), reason='POSIX modes, /proc/self/maps')
def test_world_writable_cache_is_never_mapped(fresh_build, caplog):
    fresh_build.mkdir()
    fresh_build.chmod(0o777)
    with caplog.at_level(logging.WARNING):
        assert fused_cpu.available()
    assert not _mapped(fresh_build) and not list(fresh_build.iterdir())
    (record,) = _warnings(caplog)
    assert str(fresh_build) in record.getMessage() and fused_cpu.CACHE_ENV in record.getMessage()


@needs_compiler
@pytest.mark.skipif(os.name == 'nt', reason='POSIX modes')
def test_library_writable_by_others_is_replaced(fresh_build):
    assert fused_cpu.available()
    library = next(fresh_build.glob('fused_cpu_float_*.so'))
    library.chmod(0o666)  # anyone could have swapped it since the digest was written
    _new_process()
    assert fused_cpu.available()
    assert not library.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)


# ---- E and the fallback: any failure on the way falls back, reported once ---------------------------------------

@pytest.mark.parametrize('compiler', ['no-such-compiler', 'cc "'], ids=['missing', 'unbalanced-quote'])
def test_failed_build_falls_back_with_one_warning(fresh_build, tmp_path, monkeypatch, caplog, compiler):
    monkeypatch.setenv('CC', str(tmp_path / compiler) if compiler.startswith('no-') else compiler)
    layer = HaloAttention(16, block_size=4, halo_size=1, heads=2, dim_head=8).double()
    x = torch.randn(4, 16, 64, 64, dtype=torch.float64)  # more logits than one tile: 'auto' runs 'tiled' here
    with caplog.at_level(logging.WARNING):
        outs = [layer(x) for _ in range(3)]
    warned = _warnings(caplog)  # before available() below: asked directly, it builds (and warns) on any target
    assert not fused_cpu.available() and layer._call_plan(x)[0] == 'tiled'
    assert len(warned) == (1 if fused_cpu.target()[0] != 'baseline' else 0)
    if warned:
        assert 'TIMM_HALO_ATTN_IMPL=tiled' in warned[0].getMessage()
    layer.attn_impl = 'broadcast'
    torch.testing.assert_close(outs[-1], layer(x))
    layer.attn_impl = 'fused'
    with pytest.raises(RuntimeError, match='fused') as error:
        layer(x)
    assert fused_cpu.unavailable_reason() in str(error.value)


def test_failed_compile_is_remembered_until_the_compiler_changes(fresh_build, tmp_path, monkeypatch):
    calls = tmp_path / 'calls'
    wrapper = tmp_path / 'cc-broken'

    def broken_compiler(version: str) -> None:
        wrapper.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then echo "broken cc {version}"; exit 0; fi\n'
                           f'echo compile >> {calls}\necho "error: this compiler is broken" >&2\nexit 1\n')
        wrapper.chmod(0o755)

    tries = 2 if fused_cpu._torch_openmp() else 1  # with PyTorch's OpenMP runtime, then without
    broken_compiler('1')
    monkeypatch.setenv('CC', str(wrapper))
    assert not fused_cpu.available() and 'this compiler is broken' in fused_cpu.unavailable_reason()
    assert len(calls.read_text().split()) == tries
    _new_process()
    assert not fused_cpu.available() and 'remembered' in fused_cpu.unavailable_reason()
    assert len(calls.read_text().split()) == tries  # not compiled again
    broken_compiler('2')  # another compiler version: tried again
    _new_process()
    assert not fused_cpu.available()
    assert len(calls.read_text().split()) == 2 * tries


# ---- CPUs and platforms: the compile happens only where the kernel pays off ---------------------------------------

@pytest.mark.parametrize('machine, capability', [('aarch64', 'DEFAULT'), ('arm64', 'SVE256'), ('x86_64', 'DEFAULT'),
                                                 ('AMD64', 'DEFAULT')])
def test_auto_never_compiles_where_the_kernel_cannot_pay_off(fresh_build, monkeypatch, machine, capability):
    monkeypatch.setattr('platform.machine', lambda: machine)
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: capability)
    monkeypatch.setattr(fused_cpu, '_build', lambda: pytest.fail('compiled where it cannot pay off'))
    assert fused_cpu.target() == ('baseline', [])
    assert not fused_cpu.preferred()
    layer = HaloAttention(16, block_size=4, halo_size=1, heads=2, dim_head=8).double()
    x = torch.randn(4, 16, 64, 64, dtype=torch.float64)
    assert layer._call_plan(x)[0] == 'tiled'
    out = layer(x)
    layer.attn_impl = 'broadcast'  # (the dense reference is too large at this size: layer tests compare to it)
    torch.testing.assert_close(out, layer(x))


@needs_compiler
def test_baseline_build_runs_when_asked_and_auto_leaves_it(fresh_build, monkeypatch):
    """Without AVX2 (x86-64's baseline, or NEON) the kernel has 16-byte vectors and is slower than the tiled kernel:
    'auto' runs 'tiled', an explicit 'fused' builds the portable kernel and is exact."""
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'DEFAULT')
    layer = HaloAttention(16, block_size=4, halo_size=1, heads=2, dim_head=8).double()
    x = torch.randn(4, 16, 64, 64, dtype=torch.float64)
    assert layer._call_plan(x)[0] == 'tiled' and not fresh_build.exists()
    out = layer(x)
    layer.attn_impl = 'fused'
    torch.testing.assert_close(layer(x), out)
    assert all('_baseline_' in p.name for p in fresh_build.glob('*.so'))


@needs_compiler
@pytest.mark.skipif(fused_cpu.target()[0] != 'avx512', reason='an AVX-512 CPU builds both')
def test_cache_key_names_the_instruction_set(fresh_build, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX2')
    assert fused_cpu.preferred() and fused_cpu._load()[torch.float32].vector_bytes == 32
    assert all('_avx2_' in p.name for p in fresh_build.glob('*.so'))


@needs_compiler
def test_build_needs_no_proc_cpuinfo(fresh_build, monkeypatch):
    real_read = Path.read_bytes

    def no_proc(path, *args, **kwargs):
        if str(path).startswith('/proc'):
            raise FileNotFoundError(path)
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(Path, 'read_bytes', no_proc)
    monkeypatch.setattr(Path, 'read_text', lambda path, *a, **k: no_proc(path).decode())
    assert fused_cpu.available(), fused_cpu.unavailable_reason()


@pytest.mark.heavy
def test_import_and_forward_without_register_at_fork(tmp_path):
    """Windows has no os.register_at_fork (torch, imported first here, has its own Windows path)."""
    done = _child('import os, torch\ndel os.register_at_fork\n' + CHECK_LAYER, tmp_path / 'cache')
    assert done.returncode == 0, done.stderr[-3000:]


# ---- B, C, D: the worker threads ------------------------------------------------------------------------------

@pytest.fixture
def four_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


def test_a_failing_tile_stops_the_call_after_the_running_tiles_end(four_threads):
    ended, lock = [], threading.Lock()

    def fn(start: int, stop: int) -> None:
        if start == 2:
            raise ValueError('tile 2 failed')
        time.sleep(0.02)
        with lock:
            ended.append((start, time.monotonic()))

    with pytest.raises(ValueError, match='tile 2 failed'):
        tile_pool.run_tiles(fn, 40, 1)
    raised = time.monotonic()
    time.sleep(0.1)  # a tile still running would end in here
    assert all(t <= raised for _, t in ended)
    assert len(ended) < 39  # no tile was handed out after the error


CHILD_PRELUDE = """
import signal, threading, time
import torch
from timm_halo.layers import HaloAttention
MAIN = threading.main_thread().ident

def interrupt_after(seconds):
    timer = threading.Timer(seconds, signal.pthread_kill, (MAIN, signal.SIGINT))
    timer.start()
    return timer
"""


@needs_compiler
@pytest.mark.heavy
def test_ctrl_c_mid_kernel_leaves_a_working_process(tmp_path):
    """Forward and backward interrupted at many points: each interruption is a KeyboardInterrupt, the process lives
    on, and the layer then gives exactly the results it gave before."""
    code = CHILD_PRELUDE + textwrap.dedent("""
    torch.manual_seed(0)
    torch.set_num_threads(4)
    layer = HaloAttention(64, block_size=8, halo_size=3, heads=8, dim_head=8)
    x = torch.randn(4, 64, 64, 64)
    with torch.no_grad():
        ref = layer(x)
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()
    ref_grad = xg.grad
    start = time.perf_counter()
    with torch.no_grad():
        layer(x)
    duration = time.perf_counter() - start
    interrupted = 0
    for i in range(12):
        try:
            timer = interrupt_after(duration * (0.1 + 0.12 * (i // 2)))
            try:
                if i % 2:
                    layer(x.clone().requires_grad_()).sum().backward()
                else:
                    with torch.no_grad():
                        layer(x)
            finally:
                timer.join()
        except KeyboardInterrupt:
            interrupted += 1
        junk = [torch.arange(64, dtype=torch.int32) for _ in range(2000)]  # reuses freed memory
    with torch.no_grad():
        assert torch.equal(layer(x), ref)
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()
    assert torch.equal(xg.grad, ref_grad)
    print(interrupted)
    """)
    done = _child(code, tmp_path / 'cache', TIMM_HALO_ATTN_IMPL='fused')
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) >= 6  # most calls really were interrupted mid-way


@pytest.mark.heavy
def test_ctrl_c_returns_only_after_the_running_tiles_end(tmp_path):
    """The contract that keeps the kernel's buffers alive: once Ctrl-C reaches the caller, no tile is running or
    will start."""
    code = CHILD_PRELUDE + textwrap.dedent("""
    from timm_halo.layers import tile_pool
    torch.set_num_threads(4)
    ended = []

    def tile(start, stop):
        time.sleep(0.05)
        ended.append(time.monotonic())

    tile_pool.run_tiles(tile, 8, 1)  # workers started
    ended.clear()
    timer = interrupt_after(0.12)
    try:
        tile_pool.run_tiles(tile, 400, 1)
    except KeyboardInterrupt:
        caught = time.monotonic()
    timer.join()
    time.sleep(0.3)
    assert 0 < len(ended) < 400 and max(ended) <= caught, (len(ended), max(ended) - caught)
    print('ok')
    """)
    done = _child(code, tmp_path / 'cache', timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ['ok']


@pytest.mark.heavy
def test_ctrl_c_while_the_workers_start_neither_hangs_nor_breaks_the_pool(tmp_path):
    code = CHILD_PRELUDE + textwrap.dedent("""
    from timm_halo.layers import tile_pool
    original = tile_pool._Pool._work

    def slow_start(self, ready):
        time.sleep(0.5)  # the caller is waiting for its workers when Ctrl-C comes
        original(self, ready)

    tile_pool._Pool._work = slow_start
    torch.set_num_threads(4)
    hits = []
    timer = interrupt_after(0.1)
    try:
        tile_pool.run_tiles(lambda a, b: hits.append(a), 8, 1)
        print('not interrupted')
    except KeyboardInterrupt:
        pass
    timer.join()
    assert torch.get_num_threads() == 4  # the caller's count, not the workers' 1
    tile_pool.run_tiles(lambda a, b: hits.append(a), 8, 1)
    assert sorted(hits[-8:]) == list(range(8))
    print('done')
    """)
    done = _child(code, tmp_path / 'cache', timeout=60)  # a hang at exit fails by timeout
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ['done']


@needs_compiler
@pytest.mark.heavy
def test_concurrent_callers_with_different_thread_counts(tmp_path):
    code = """
    import sys, threading
    import torch
    from timm_halo.layers import HaloAttention
    sys.setswitchinterval(1e-6)
    layer = HaloAttention(32, block_size=4, halo_size=1, heads=4, dim_head=8)
    xs = [torch.randn(2, 32, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        refs = [layer.reference_forward(x) for x in xs]
    errors = []

    def caller(threads, x, ref):
        try:
            for _ in range(40):
                torch.set_num_threads(threads)  # process-wide in most builds: the two callers keep changing it
                with torch.no_grad():
                    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4)
        except BaseException as e:
            errors.append(repr(e))

    workers = [threading.Thread(target=caller, args=(n, x, r)) for n, x, r in zip((2, 3), xs, refs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    print('ok')
    """
    done = _child(textwrap.dedent(code), tmp_path / 'cache', TIMM_HALO_ATTN_IMPL='fused')
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    assert done.stdout.split() == ['ok']


def test_pool_belongs_to_the_process_that_made_it(four_threads, monkeypatch):
    tile_pool.run_tiles(lambda a, b: None, 8, 1)
    parent = tile_pool._current_pool()
    monkeypatch.setattr(os, 'getpid', lambda: -1)  # as in a forked child
    child = tile_pool._current_pool()
    assert child is not parent and not child.workers
    seen = []
    tile_pool.run_tiles(lambda a, b: seen.append(a), 8, 1)
    assert sorted(seen) == list(range(8))


@pytest.mark.skipif(sys.platform != 'linux', reason='fork start method')
def test_forked_dataloader_workers_run_the_kernel(tmp_path):
    """After the parent ran the kernel on 2 threads (on PyTorch's OpenMP team where it is built so), forked
    DataLoader workers (one thread each, as PyTorch sets them) run it too and get the parent's answers. (A forked
    child that keeps several threads hangs in any OpenMP op of PyTorch's, a convolution included: libgomp does not
    survive fork; DataLoader is what sets one thread.)"""
    done = _child("""
        import torch
        from timm_halo.layers import HaloAttention
        torch.set_num_threads(2)
        layer = HaloAttention(16, block_size=4, halo_size=1, heads=2, dim_head=8, attn_impl='fused').eval()
        x = torch.randn(4, 16, 24, 24)
        with torch.no_grad():
            ref = layer(x)

        class Windows(torch.utils.data.Dataset):
            def __len__(self):
                return 4

            def __getitem__(self, i):
                with torch.no_grad():
                    return layer(x[i:i + 1])[0]

        loader = torch.utils.data.DataLoader(Windows(), batch_size=2, num_workers=2, multiprocessing_context='fork')
        out = torch.cat(list(loader))
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        print('ok')
    """, tmp_path / 'cache', timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith('ok'), done.stderr[-2000:]
