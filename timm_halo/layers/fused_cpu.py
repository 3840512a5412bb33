"""Fused windowed attention for CPUs: a small C kernel (``fused_cpu.c``) as ``torch.library`` custom ops; its build,
cache, fallback and threads: docs/kernels.md."""
import atexit
import ctypes
import hashlib
import inspect
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .broadcast import attend_broadcast
from .tile_pool import run_tiles
from .tiled import differentiable_backward
from .windows import blocks_to_map, map_to_blocks, unfold_windows

__all__ = ['attend_fused', 'attend_fused_maps', 'attend_fused_tables', 'available', 'expand_tables', 'preferred',
           'unavailable_reason', 'DTYPES']

CACHE_ENV = 'TIMM_HALO_CACHE'
DTYPES = {torch.float32: 'float', torch.float64: 'double'}  # the C kernel's scalar type
_SOURCE = Path(__file__).with_name('fused_cpu.c')
_FLAGS = ['-O3', '-fno-math-errno', '-fPIC', '-shared']
# x86-64 instruction sets worth the kernel (PyTorch's name -> the build's flags): AVX-512 as PyTorch requires it
# (F, BW, DQ, VL); measured 1.1-1.9x the tiled kernel there, and slower than it with 16-byte vectors.
_WIDE_ISAS = {'AVX512': ['-mavx512f', '-mavx512bw', '-mavx512dq', '-mavx512vl', '-mavx2', '-mfma'],
              'AVX2': ['-mavx2', '-mfma']}
_X86_64 = ('x86_64', 'amd64', 'x64')
AUTO_MIN_VECTOR_BYTES = 32

_logger = logging.getLogger(__name__)
_lock = threading.Lock()


class _Kernel(NamedTuple):
    ranges: Tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]  # forward / backward over a range of windows
    args_type: type  # HaloArgs for this scalar type
    vector_bytes: int
    all_ranges: Optional[Tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]]  # fwd / bwd on PyTorch's OpenMP team, or None


_libs: Optional[Dict[torch.dtype, _Kernel]] = None
_error: Optional[str] = None

_INT_FIELDS = ('d', 'dv', 'Q', 'kh', 'kw', 'rows_h', 'rows_w', 'nh', 'nw', 'bq', 'mode')
_TABLE_NAMES = ('rel_h', 'rel_w', 'base_h', 'base_w', 'mask_h', 'mask_w')
_POINTER_FIELDS = ('q', 'k', 'v', *_TABLE_NAMES, 'out', 'stats', 'grad_out', 'grad_q', 'grad_k', 'grad_v',
                   'grad_rel_h', 'grad_rel_w')


class Layout(ctypes.Structure):
    """The mirror of ``Layout`` in fused_cpu.c: where an operand's windows lie (element strides and image bounds)."""
    _fields_ = [*[(name, ctypes.c_int64) for name in ('group', 'channel', 'block_y', 'block_x', 'row')],
                *[(name, ctypes.c_int32) for name in ('step_y', 'step_x', 'pad_y', 'pad_x', 'height', 'width')]]


class Layouts(ctypes.Structure):
    _fields_ = [(name, Layout) for name in ('q', 'k', 'v', 'out')]


def _args_type(real) -> type:
    """The ctypes mirror of ``HaloArgs`` in fused_cpu.c, for scalar type ``real``."""
    return type('HaloArgs', (ctypes.Structure,), {'_fields_': [
        *[(name, ctypes.c_int32) for name in _INT_FIELDS], ('calls_stride', ctypes.c_int64), ('scale', real),
        *[(name, ctypes.c_void_p) for name in _POINTER_FIELDS], ('lay', Layouts)]})


def _windows_layout(t: torch.Tensor, nh: int, nw: int, rows: int, cols: int) -> Layout:
    """(N, C, rows * cols): windows one after another, ordered (group, block row, block column)."""
    per_window = t.stride(0)
    return Layout(per_window * nh * nw, t.stride(1), per_window * nw, per_window, cols, rows, cols, 0, 0, nh * rows,
                  nw * cols)


def _map_layout(t: torch.Tensor, step_y: int, step_x: int, pad_y: int, pad_x: int) -> Layout:
    """(G, C, H, W) with contiguous rows; positions outside the map read as 0."""
    # block (by, bx)'s window starts at (by * step_y - pad_y, bx * step_x - pad_x)
    row = t.stride(2)
    return Layout(t.stride(0), t.stride(1), step_y * row, step_x, row, step_y, step_x, pad_y, pad_x, t.shape[2],
                  t.shape[3])


def target() -> Tuple[str, List[str]]:
    """The instruction set the kernel is built for here, and its flags."""
    # PyTorch's own detection (which ATEN_CPU_CAPABILITY can lower) on x86-64, else the compiler's default target
    capability = torch.backends.cpu.get_cpu_capability().upper()
    if platform.machine().lower() in _X86_64 and capability in _WIDE_ISAS:
        return capability.lower(), _WIDE_ISAS[capability]
    return 'baseline', []


def _insecure(path: Path) -> Optional[str]:
    """Why another user could replace what ``path`` holds, or None."""
    if os.name == 'nt':  # POSIX modes do not describe Windows ACLs
        return None
    info = path.stat()
    if hasattr(os, 'getuid') and info.st_uid != os.getuid():
        return f'{path} belongs to another user (uid {info.st_uid})'
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f'{path} can be written by other users (mode {stat.filemode(info.st_mode)})'
    return None


def _cache_dir() -> Path:
    """The cache folder, absolute, private to this user; else a private temporary folder for this process."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), 'timm_halo')
    root = Path(os.path.abspath(os.path.expanduser(root)))  # ctypes searches the library path for relative names
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        problem = _insecure(root)
    except OSError as e:
        problem = f'{root} cannot be used ({e})'
    if problem is None:
        return root
    private = Path(tempfile.mkdtemp(prefix='timm_halo_'))  # mode 0700
    atexit.register(shutil.rmtree, private, ignore_errors=True)
    _logger.warning('timm_halo: the fused CPU kernel is not cached: %s; it is built in %s for this process. '
                    'Point %s to a folder of your own (mode 0700) to cache it.', problem, private, CACHE_ENV)
    return private


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _matches(library: Path, digest: Path) -> bool:
    """True when ``library`` is exactly what a build here wrote (its digest file agrees) and is this user's."""
    try:
        return _insecure(library) is None and digest.read_text().strip() == _digest(library)
    except OSError:
        return False


def _torch_openmp() -> List[str]:
    """Arguments that link the kernel against torch/lib's libgomp (ATen's threads run its ranges); [] if none."""
    found = sorted((Path(torch.__file__).parent / 'lib').glob('libgomp*.so*')) if platform.system() == 'Linux' else []
    if not found:
        return []
    # --as-needed: the compiler's own -lgomp (added by -fopenmp, after these) is not recorded as a dependency
    return ['-fopenmp', '-Wl,--as-needed', str(found[0]), f'-Wl,-rpath,{found[0].parent}']


def _compile(compiler: List[str], flags: List[str], library: Path, digest: Path, failed: Path) -> None:
    """Build into temporary names, then rename: concurrent first uses (DDP ranks) never see a partial file."""
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=library.parent)
    os.close(fd)
    try:  # the source before the flags: a shared library among them links only what the source needs
        done = subprocess.run([*compiler, str(_SOURCE), *flags, '-o', tmp, '-lm'], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            message = f'{" ".join(compiler)} failed: {done.stderr.strip()[-2000:]}'
            failed.write_text(message)  # later processes skip this build (a changed compiler or source retries)
            raise RuntimeError(message)
        digest_tmp = f'{tmp}.sha256'
        Path(digest_tmp).write_text(_digest(Path(tmp)))
        os.replace(tmp, library)
        os.replace(digest_tmp, digest)
    finally:
        for leftover in (tmp, f'{tmp}.sha256'):
            if os.path.exists(leftover):
                os.remove(leftover)


def _build_variant(compiler: List[str], version: str, isa: str, isa_flags: List[str], scalar: str,
                   cache: Path) -> _Kernel:
    """The library for these flags, from the cache when a build here wrote it, else compiled; then loaded."""
    flags = [*_FLAGS, *isa_flags, *(['-DHALO_DOUBLE'] if scalar == 'double' else [])]
    key = hashlib.sha256(b'\0'.join([_SOURCE.read_bytes(), ' '.join(compiler + flags).encode(),
                                     version.encode()])).hexdigest()[:16]
    stem = cache / f'fused_cpu_{scalar}_{isa}_{key}'
    library, digest, failed = (Path(f'{stem}{suffix}') for suffix in ('.so', '.so.sha256', '.failed'))
    if failed.exists():
        raise RuntimeError(f'{failed.read_text().strip()[:2000]} (remembered from an earlier build; delete {failed} '
                           'to try again)')
    if not _matches(library, digest):
        _compile(compiler, flags, library, digest, failed)
        if not _matches(library, digest):
            raise RuntimeError(f'{library} changed while it was being loaded')
    lib = ctypes.CDLL(str(library))
    args_type = _args_type(ctypes.c_double if scalar == 'double' else ctypes.c_float)
    lib.halo_args_bytes.restype = ctypes.c_int64  # (every other function returns ctypes' default, an int)
    if lib.halo_args_bytes() != ctypes.sizeof(args_type):
        raise RuntimeError(f'{library} does not match fused_cpu.py (its HaloArgs has another layout)')
    pointer = ctypes.POINTER(args_type)
    for fn in (lib.halo_fwd, lib.halo_bwd):
        fn.argtypes = [pointer, ctypes.c_int64, ctypes.c_int64]  # (args, start, stop)
    for fn in (lib.halo_fwd_all, lib.halo_bwd_all):
        fn.argtypes = [pointer, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]  # (args, n, chunk, threads)
    return _Kernel((lib.halo_fwd, lib.halo_bwd), args_type, lib.halo_vector_bytes(),
                   (lib.halo_fwd_all, lib.halo_bwd_all) if lib.halo_openmp() else None)


def _build() -> Dict[torch.dtype, _Kernel]:
    compiler = shlex.split(os.environ.get('CC') or 'cc')
    if not compiler:
        raise RuntimeError('$CC names no compiler')
    version = subprocess.run([*compiler, '--version'], capture_output=True, text=True, timeout=60)
    if version.returncode != 0:
        raise RuntimeError(f'{" ".join(compiler)} --version failed: {version.stderr.strip()[-500:]}')
    isa, isa_flags = target()
    cache, openmp = _cache_dir(), _torch_openmp()

    def build(scalar: str) -> _Kernel:  # on PyTorch's OpenMP runtime where that builds, else ranges on the tile pool
        if openmp:
            try:
                return _build_variant(compiler, version.stdout, isa, [*isa_flags, *openmp], scalar, cache)
            except (RuntimeError, OSError) as e:
                _logger.info('timm_halo: building the fused CPU kernel with OpenMP failed (%s); building it without', e)
        return _build_variant(compiler, version.stdout, isa, isa_flags, scalar, cache)

    return {dtype: build(scalar) for dtype, scalar in DTYPES.items()}


def _load() -> Optional[Dict[torch.dtype, _Kernel]]:
    global _libs, _error
    if _libs is None and _error is None:
        with _lock:
            if _libs is None and _error is None:
                try:
                    _libs = _build()
                except Exception as e:  # noqa: BLE001 - any failure on the way (a bad $CC, a crashed compiler, an
                    # unwritable cache, a bad library) turns the kernel off with its reason
                    _error = f'{type(e).__name__}: {e}'
                    _logger.warning("timm_halo: the fused CPU kernel is off (%s); HaloAttention's 'auto' runs the "
                                    "'tiled' kernel instead. Set %s=tiled to skip the fused kernel and this warning.",
                                    _error, 'TIMM_HALO_ATTN_IMPL')
    return _libs


# torch.compile calls these at trace time and keeps the answer (a constant of the graph): dynamo must not trace the
# lock and the compiler run of a first use.
@torch.compiler.assume_constant_result
def available() -> bool:
    """True when the C kernel is built (or can be, on this first call) and loaded."""
    return _load() is not None


@torch.compiler.assume_constant_result
def preferred() -> bool:
    """True when 'auto' should run this kernel: 32-byte vectors or wider (known before any compile), and built."""
    return target()[0] != 'baseline' and available() and _load()[torch.float32].vector_bytes >= AUTO_MIN_VECTOR_BYTES


def unavailable_reason() -> str:
    _load()
    return _error or ''


def _library(dtype: torch.dtype) -> _Kernel:
    libs = _load()
    if libs is None:
        raise RuntimeError(f"HaloAttention: attn_impl='fused' needs a C compiler to build its CPU kernel, and the "
                           f"build failed ({_error}); use attn_impl='tiled' or 'auto'")
    return libs[dtype]


_ERRORS = {1: (MemoryError, 'the fused CPU kernel could not allocate its scratch buffers'),
           2: (IndexError, 'a relative-table row outside the table (fused CPU kernel); please report'),
           3: (ValueError, 'fused CPU kernel operands that do not fit together; please report')}


def _tables_mode(rel_h: torch.Tensor) -> bool:
    """The relative terms' source: the (rows, d) tables themselves, or each query's products with them."""
    return rel_h.dim() == 2


def _geometry(q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], tables) -> Tuple[int, ...]:
    """(n, d, dv, Q, kh, kw, nh, nw, bq) of a call, checked: the C kernel reads raw memory at these offsets."""
    # Windows: q (N, d, Q), k (N, d, K), v (N, dv, K); maps (v None): q (G, d, Hq, Wq) in blocks of bq x bq, k the
    # key / value map (G, d + dv, H, W).
    rel_h, rel_w, base_h, base_w, mask_h, mask_w = tables
    (nh, bq), (nw, bq_w), kh, kw = base_h.shape, base_w.shape, mask_h.shape[-1], mask_w.shape[-1]
    if v is None:
        g, d, hq, wq = q.shape
        n, dv, num_q = g * nh * nw, k.shape[1] - d, bq * bq
        fits = k.dim() == 4 and k.shape[0] == g and dv > 0 and -(-hq // bq) == nh and -(-wq // bq) == nw
        expected = []
    else:
        n, d, num_q = q.shape
        dv = v.shape[1]
        fits = q.dim() == 3 and bq * bq == num_q and n % (nh * nw) == 0
        expected = [(k, (n, d, kh * kw)), (v, (n, dv, kh * kw))]
    rel = [(rel_h.shape[0], d), (rel_w.shape[0], d)] if _tables_mode(rel_h) else [
        (n, rel_h.shape[1], num_q), (n, rel_w.shape[1], num_q)]
    expected += [(rel_h, rel[0]), (rel_w, rel[1]), (mask_h, (nh, kh)), (mask_w, (nw, kw))]
    bad = [f'{list(t.shape)} (expected {list(shape)})' for t, shape in expected if tuple(t.shape) != shape]
    if not fits or bq_w != bq or bad:
        raise ValueError(f'HaloAttention: inconsistent fused-kernel operands: q {list(q.shape)}, k {list(k.shape)}, '
                         f'blocks {nh} x {nw} of {bq} x {bq} queries; {", ".join(bad)}')
    if base_h.dtype != torch.int32 or base_w.dtype != torch.int32:
        raise TypeError(f'HaloAttention: fused-kernel table rows must be int32, got {base_h.dtype} / {base_w.dtype}')
    return n, d, dv, num_q, kh, kw, nh, nw, bq


def _chunk(n: int, group: int = 1) -> int:
    """Windows per range: about 8 ranges per thread, a multiple of ``group`` (a backward over overlapping windows
    adds each range's key gradients into the map: ranges of whole groups never add to the same element)."""
    chunk = max(1, -(-n // (8 * torch.get_num_threads())))
    return -(-chunk // group) * group


def _run(kernel: _Kernel, backward: bool, scale: float, geometry, window: List[int], **tensors: torch.Tensor) -> None:
    """The C kernel over all windows, in ranges of ``_chunk`` windows on PyTorch's OpenMP team or the tile pool."""
    # tensors: the operands by name (HaloArgs' fields); they, and so the memory the kernel reads, live until every
    # range has ended (run_tiles waits for them, also on an error or a KeyboardInterrupt)
    n, d, dv, num_q, kh, kw, nh, nw, bq = geometry
    q, k, v, out = (tensors[name] for name in ('q', 'k', 'v', 'out'))
    if window:  # maps: query blocks of bq x bq; block (by, bx)'s key window at (by * step_h - pad_h, ...)
        step_h, pad_h, step_w, pad_w = window
        blocks, keys = (bq, bq, 0, 0), (step_h, step_w, pad_h, pad_w)
        lay = Layouts(*(_map_layout(t, *at) for t, at in ((q, blocks), (k, keys), (v, keys), (out, blocks))))
    else:
        lay = Layouts(*(_windows_layout(t, nh, nw, *sides) for t, sides in ((q, (bq, bq)), (k, (kh, kw)),
                                                                           (v, (kh, kw)), (out, (bq, bq)))))
    chunk = _chunk(n, nh * nw if backward else 1)
    args = kernel.args_type(
        d=d, dv=dv, Q=num_q, kh=kh, kw=kw, rows_h=tensors['rel_h'].shape[-2], rows_w=tensors['rel_w'].shape[-2],
        nh=nh, nw=nw, bq=bq, mode=int(_tables_mode(tensors['rel_h'])), calls_stride=chunk, scale=scale, lay=lay,
        **{name: t.data_ptr() for name, t in tensors.items()})
    fn, pointer, threads = kernel.ranges[backward], ctypes.byref(args), torch.get_num_threads()
    if kernel.all_ranges is not None and threads > 1 and n > chunk:
        _raise_status(kernel.all_ranges[backward](pointer, n, chunk, threads))
    else:  # the caller runs a share too: a C call runs no ATen ops
        run_tiles(lambda start, stop: _raise_status(fn(pointer, start, stop)), n, chunk, caller_runs=True)


def _raise_status(status: int) -> None:
    if status:
        kind, message = _ERRORS[status]
        raise kind(f'HaloAttention: {message}')


def _prepare(q, k, v, tables, *others: torch.Tensor):
    """The kernel, the checked geometry, contiguous operands (maps: v from k's channels) and the tables by name."""
    floats = [q, k, *([] if v is None else [v]), *tables[:2], *tables[4:], *others]
    if q.dtype not in DTYPES or any(t.dtype != q.dtype for t in floats):
        raise TypeError(f"HaloAttention: attn_impl='fused' runs fp32 or fp64 (one dtype), got "
                        f"{sorted({str(t.dtype) for t in floats})}; use attn_impl='tiled' or 'auto' (autocast)")
    if any(t.device.type != 'cpu' for t in floats):
        raise RuntimeError("HaloAttention: attn_impl='fused' runs on cpu only")
    kernel = _library(q.dtype)
    geometry = _geometry(q, k, v, tables)
    q, k, *tables = (t.contiguous() for t in (q, k, *tables))
    return kernel, geometry, q, k, k[:, q.shape[1]:] if v is None else v.contiguous(), dict(zip(_TABLE_NAMES, tables))


# flexible_layout: inductor may pass any strides (the implementation makes its operands contiguous); matching them
# exactly needs it to order symbolic strides, which it cannot do for the maps of a dynamic-size graph. torch 2.6's
# custom_op takes no tags (its inductor does not ask for exact strides).
_FLEXIBLE = {'tags': (torch.Tag.flexible_layout,)} if 'tags' in inspect.signature(torch.library.custom_op).parameters \
    else {}


def _per_head(heads: int, *maps: torch.Tensor) -> List[torch.Tensor]:
    """(B, heads * C, H, W) maps as (B * heads, C, H, W)."""
    # In here, not in the caller's graph, where inductor would have to order a reshaped conv output's symbolic strides
    return [m.contiguous().view(m.shape[0] * heads, m.shape[1] // heads, *m.shape[2:]) for m in maps]


@torch.library.custom_op('timm_halo::attend_fused', mutates_args=(), **_FLEXIBLE)
def _attend_fused(
        q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], qt_h: torch.Tensor, qt_w: torch.Tensor,
        base_h: torch.Tensor, base_w: torch.Tensor, mask_h: torch.Tensor, mask_w: torch.Tensor, window: List[int],
        scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, stats). Maps (``v`` None, ``window`` given): ``q`` and ``k`` of all heads, run per head."""
    kernel, geometry, q_in, k_in, v_in, named = _prepare(
        *(_per_head(window[0], q, k) if window else (q, k)), v, (qt_h, qt_w, base_h, base_w, mask_h, mask_w))
    out = q_in.new_empty(q_in.shape[0], geometry[2], *q_in.shape[2:])  # as q, with dv channels
    stats = q.new_empty(geometry[0], geometry[3], 2)  # per query: max logit, 1 / sum of exp
    _run(kernel, False, scale, geometry, window[1:], q=q_in, k=k_in, v=v_in, **named, out=out, stats=stats)
    return out.view(q.shape[0], out.shape[1] * (window[0] if window else 1), *q.shape[2:]), stats


@_attend_fused.register_fake
def _attend_fused_fake(q, k, v, qt_h, qt_w, base_h, base_w, mask_h, mask_w, window, scale):
    if v is None:
        n = q.shape[0] * window[0] * base_h.shape[0] * base_w.shape[0]
        return q.new_empty(q.shape[0], k.shape[1] - q.shape[1], *q.shape[2:]), q.new_empty(n, base_h.shape[1] ** 2, 2)
    return q.new_empty(q.shape[0], v.shape[1], q.shape[2]), q.new_empty(q.shape[0], q.shape[2], 2)


# The backward is an op of its own, so that compiled graphs call the kernel (inductor sees one opaque node).
@torch.library.custom_op('timm_halo::attend_fused_backward', mutates_args=(), **_FLEXIBLE)
def _attend_fused_backward(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], qt_h: torch.Tensor,
        qt_w: torch.Tensor, base_h: torch.Tensor, base_w: torch.Tensor, mask_h: torch.Tensor, mask_w: torch.Tensor,
        out: torch.Tensor, stats: torch.Tensor, window: List[int], scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v and the two relative sources; with maps, of the q and kv maps (and an empty one of v)."""
    grad_out, out, q_in, k_in = _per_head(window[0], grad_out, out, q, k) if window else (grad_out, out, q, k)
    kernel, geometry, q_in, k_in, v_in, named = _prepare(q_in, k_in, v, (qt_h, qt_w, base_h, base_w, mask_h, mask_w),
                                                         grad_out, out, stats)
    n, d, dv, num_q, kh, kw, nh, nw, bq = geometry
    out_shape = (q_in.shape[0], dv, *q_in.shape[2:])
    if tuple(grad_out.shape) != out_shape or tuple(out.shape) != out_shape or tuple(stats.shape) != (n, num_q, 2):
        raise ValueError(f'HaloAttention: inconsistent fused-kernel operands: out {list(out.shape)}, grad_out '
                         f'{list(grad_out.shape)}, stats {list(stats.shape)} for q {list(q_in.shape)}, {dv} channels')
    grad_q = torch.empty_like(q_in)  # laid out as q, as the kernel writes it
    # laid out as k and v; the kernel adds each window's gradients in (maps: overlapping windows, summed)
    grad_k = torch.zeros_like(k_in)
    grad_v = grad_k[:, d:] if v is None else torch.zeros_like(v_in)
    # tables: one table gradient per range of windows (concurrent ranges never share one), summed here
    calls = -(-n // _chunk(n, nh * nw)) if _tables_mode(qt_h) else 0
    grad_h, grad_w = (t.new_zeros(calls, *t.shape) if calls else t.new_empty(t.shape) for t in (qt_h, qt_w))
    _run(kernel, True, scale, geometry, window[1:], q=q_in, k=k_in, v=v_in, **named, out=out.contiguous(),
         stats=stats.contiguous(), grad_out=grad_out.contiguous(), grad_q=grad_q, grad_k=grad_k, grad_v=grad_v,
         grad_rel_h=grad_h, grad_rel_w=grad_w)
    if calls:
        grad_h, grad_w = grad_h.sum(0), grad_w.sum(0)
    if v is None:  # the key / value map's gradient is grad_k
        grad_v = grad_k.new_empty(0)
    return grad_q.view(q.shape), grad_k.view(k.shape), grad_v, grad_h, grad_w


@_attend_fused_backward.register_fake
def _attend_fused_backward_fake(grad_out, q, k, v, qt_h, qt_w, base_h, base_w, mask_h, mask_w, out, stats, window,
                                scale):
    grad_v = q.new_empty(0) if v is None else v.new_empty(v.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), grad_v, qt_h.new_empty(qt_h.shape), qt_w.new_empty(qt_w.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, *tables, window, scale = inputs
    ctx.window, ctx.scale = window, scale
    ctx.save_for_backward(q, k, v, *tables, *output)
    ctx.mark_non_differentiable(output[1])  # the stats


def _recompute_maps(q, kv, qt_h, qt_w, base_h, base_w, mask_h, mask_w, window: List[int], scale: float):
    """The maps call in plain ops (double backward)."""
    (nh, bq), nw, kh, kw = base_h.shape, base_w.shape[0], mask_h.shape[1], mask_w.shape[1]
    heads, step_h, pad_h, step_w, pad_w = window
    batch = q.shape[0]
    q, kv = (t.reshape(batch * heads, t.shape[1] // heads, *t.shape[2:]) for t in (q, kv))
    padded = F.pad(kv, [pad_w, (nw - 1) * step_w + kw - pad_w - kv.shape[3],
                        pad_h, (nh - 1) * step_h + kh - pad_h - kv.shape[2]])
    k, v = unfold_windows(padded, 1, q.shape[1], step_h, kh, step_w, kw)
    q_windows = map_to_blocks(q, bq, nh, nw)
    rel = expand_tables(q_windows, qt_h, qt_w, base_h, base_w, mask_h, mask_w)
    out = blocks_to_map(attend_broadcast(q_windows, k, v, *rel, scale), bq, nh, nw, *q.shape[2:])
    return out.reshape(batch, heads * out.shape[1], *q.shape[2:])


def _autograd(ctx, grad_out, _grad_stats):
    q, k, v, qt_h, qt_w, base_h, base_w, mask_h, mask_w, out, stats = ctx.saved_tensors  # v None: maps
    if torch.is_grad_enabled():  # create_graph=True: differentiable recomputation (double backward)
        def recompute(q, k, v, qt_h, qt_w):
            if v is None:
                return _recompute_maps(q, k, qt_h, qt_w, base_h, base_w, mask_h, mask_w, ctx.window, ctx.scale)
            return attend_broadcast(q, k, v, *expand_tables(q, qt_h, qt_w, base_h, base_w, mask_h, mask_w), ctx.scale)
        grads = list(differentiable_backward(grad_out, (q, k, v, qt_h, qt_w), recompute))
    else:
        grads = list(_attend_fused_backward(grad_out, q, k, v, qt_h, qt_w, base_h, base_w, mask_h, mask_w, out,
                                            stats, ctx.window, ctx.scale))
        if v is None:
            grads[2] = None
    return *grads, None, None, None, None, None, None


_attend_fused.register_autograd(_autograd, setup_context=_setup_context)


def expand_tables(
        q: torch.Tensor, qt_h: torch.Tensor, qt_w: torch.Tensor, base_h: torch.Tensor, base_w: torch.Tensor,
        mask_h: torch.Tensor, mask_w: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``attend_fused_tables``' per-axis terms (rel_h, rel_w) in plain ops (double backward, tests)."""
    if _tables_mode(qt_h):
        qt_h, qt_w = torch.matmul(qt_h, q), torch.matmul(qt_w, q)  # (N, rows, bq * bq)
    n, _, num_q = q.shape
    (nh, bq), nw, kh, kw = base_h.shape, base_w.shape[0], mask_h.shape[1], mask_w.shape[1]
    rows_h = base_h.long()[:, :, None] + torch.arange(kh, device=q.device)  # (nh, bq, kh): (block row, y, key row)
    rows_w = base_w.long()[:, :, None] + torch.arange(kw, device=q.device)
    qt_h = qt_h.view(-1, nh, nw, qt_h.shape[1], bq, bq)  # (., by, bx, table row, y, x)
    qt_w = qt_w.view(-1, nh, nw, qt_w.shape[1], bq, bq)
    lead = qt_h.shape[0]
    rel_h = qt_h.gather(3, rows_h.permute(0, 2, 1)[None, :, None, :, :, None].expand(lead, nh, nw, kh, bq, bq))
    rel_w = qt_w.gather(3, rows_w.permute(0, 2, 1)[None, None, :, :, None, :].expand(lead, nh, nw, kw, bq, bq))
    rel_h = rel_h + mask_h[None, :, None, :, None, None]
    rel_w = rel_w + mask_w[None, None, :, :, None, None]
    return (rel_h.permute(0, 1, 2, 4, 5, 3).reshape(n, bq, bq, kh),
            rel_w.permute(0, 1, 2, 4, 5, 3).reshape(n, bq, bq, kw))


def attend_fused_tables(
        q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], qt_h: torch.Tensor, qt_w: torch.Tensor,
        base_h: torch.Tensor, base_w: torch.Tensor, mask_h: torch.Tensor, mask_w: torch.Tensor, scale: float,
        window: Sequence[int] = (),
) -> torch.Tensor:
    """Fused windowed attention (CPU), each query's relative terms built from the tables (docs/kernels.md)."""
    floats = [q, k, v, qt_h, qt_w, mask_h, mask_w]
    if q.dtype not in DTYPES or any(t is not None and t.dtype != q.dtype for t in floats):
        # the kernel computes in fp32 or fp64: bf16 / fp16 (autocast) are widened to fp32, the result cast back
        wide = torch.promote_types(torch.promote_types(q.dtype, k.dtype), torch.float32)
        floats = [None if t is None else t.to(wide) for t in floats]
    wq, wk, wv, qt_h, qt_w, mask_h, mask_w = floats
    out = _attend_fused(wq, wk, wv, qt_h, qt_w, base_h.to(torch.int32), base_w.to(torch.int32), mask_h, mask_w,
                        [int(w) for w in window], scale)[0]
    return out.to(q.dtype)


def attend_fused_maps(
        q: torch.Tensor, kv: torch.Tensor, table_h: torch.Tensor, table_w: torch.Tensor, base_h: torch.Tensor,
        base_w: torch.Tensor, mask_h: torch.Tensor, mask_w: torch.Tensor, window: List[int], scale: float,
) -> torch.Tensor:
    """``attend_fused_tables`` reading its windows straight from the q and kv maps (docs/kernels.md)."""
    return attend_fused_tables(q, kv, None, table_h, table_w, base_h, base_w, mask_h, mask_w, scale, window)


def attend_fused(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Fused windowed attention (CPU) with ``attend_broadcast``'s interface: per-axis terms given whole."""
    # one table row per key row and query: base 0, no mask
    n, bq, _, kh = rel_h.shape
    kw = rel_w.shape[-1]
    zeros = torch.zeros(1, bq, dtype=torch.int32, device=q.device)
    return attend_fused_tables(q, k, v, rel_h.reshape(n, bq * bq, kh).transpose(1, 2),
                               rel_w.reshape(n, bq * bq, kw).transpose(1, 2), zeros, zeros,
                               rel_h.new_zeros(1, kh), rel_w.new_zeros(1, kw), scale)
