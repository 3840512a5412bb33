"""Fused windowed attention for CPUs: a small C kernel (``fused_cpu.c``) as ``torch.library`` custom ops.

The tiled kernel (tiled.py) makes about a dozen passes of ATen ops over each tile of logits, and at HaloNet's head
widths (8-64 channels) those passes, not the arithmetic, are its cost. Here a window's logits are built,
normalised and consumed in a per-thread buffer by small register-blocked matrix products, forward and backward
(flash-attention style: the forward keeps each query's max logit and 1 / sum of exp, the backward recomputes the
same probabilities from them); no logits reach a tensor.

The C file is compiled on first use with the system C compiler (``cc``, or ``$CC``) for this machine
(``-march=native``) into a cache (``$TIMM_HALO_CACHE``, else ``~/.cache/timm_halo``) keyed by the source, compiler
and CPU, and loaded with ctypes (about a second, once per machine). Where no compiler works, ``available()`` is
False: ``'auto'`` then runs the tiled kernel, and an explicit ``attn_impl='fused'`` is an error naming the
compiler's message. Ranges of windows run on the tile pool's worker threads (ctypes releases the GIL), so the kernel
keeps tiled.py's behaviour on a busy machine. The kernel computes in fp32 or fp64; bf16/fp16 (autocast) inputs are
widened to fp32.
"""
import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .broadcast import attend_broadcast
from .tile_pool import run_tiles
from .tiled import differentiable_backward

__all__ = ['attend_fused', 'attend_fused_tables', 'available', 'expand_tables', 'preferred', 'unavailable_reason',
           'DTYPES']

CACHE_ENV = 'TIMM_HALO_CACHE'
DTYPES = {torch.float32: 'float', torch.float64: 'double'}  # the C kernel's scalar type
_SOURCE = Path(__file__).with_name('fused_cpu.c')
_FLAGS = ['-O3', '-march=native', '-fno-math-errno', '-fPIC', '-shared']

_lock = threading.Lock()
_libs: Optional[Dict[torch.dtype, ctypes.CDLL]] = None
_error: Optional[str] = None


def _cpu_signature() -> str:
    """The CPU model and feature flags: a library built with -march=native must not run on another CPU (a cache
    shared between machines, e.g. a network home directory)."""
    try:
        lines = Path('/proc/cpuinfo').read_text().splitlines()
        return '\n'.join(sorted({ln for ln in lines if ln.startswith(('model name', 'flags', 'Features'))}))
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), 'timm_halo')
    return Path(root)


def _build_one(compiler, version: str, scalar: str) -> ctypes.CDLL:
    flags = [*_FLAGS, *(['-DHALO_DOUBLE'] if scalar == 'double' else [])]
    key = hashlib.sha256(b'\0'.join([_SOURCE.read_bytes(), ' '.join(compiler + flags).encode(), version.encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    target = _cache_dir() / f'fused_cpu_{scalar}_{key}.so'
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build under a temporary name, then rename: concurrent first uses (DDP ranks) never load a partial file.
        fd, tmp = tempfile.mkstemp(suffix='.so', dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([*compiler, *flags, str(_SOURCE), '-o', tmp, '-lm'],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f'{" ".join(compiler)} failed: {done.stderr.strip()[-2000:]}')
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    lib = ctypes.CDLL(str(target))
    real = {'float': ctypes.c_float, 'double': ctypes.c_double}[scalar]
    head = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, real]  # window range, geometry, scale
    lib.halo_fwd.argtypes = head + [ctypes.c_void_p] * 11
    lib.halo_bwd.argtypes = head + [ctypes.c_void_p] * 17
    lib.halo_fwd.restype = lib.halo_bwd.restype = lib.halo_vector_bytes.restype = ctypes.c_int
    return lib


def _build() -> Dict[torch.dtype, ctypes.CDLL]:
    compiler = shlex.split(os.environ.get('CC') or 'cc')
    version = subprocess.run([*compiler, '--version'], capture_output=True, text=True, timeout=60).stdout
    return {dtype: _build_one(compiler, version, scalar) for dtype, scalar in DTYPES.items()}


def _load() -> Optional[Dict[torch.dtype, ctypes.CDLL]]:
    global _libs, _error
    if _libs is None and _error is None:
        with _lock:
            if _libs is None and _error is None:
                try:
                    _libs = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    _error = f'{type(e).__name__}: {e}'
    return _libs


# torch.compile calls this at trace time and keeps the answer (a constant of the graph): dynamo must not trace the
# lock and the compiler run of a first use.
@torch.compiler.assume_constant_result
def available() -> bool:
    """True when the C kernel is built (or can be, on this first call) and loaded."""
    return _load() is not None


# Measured (benchmarks/RESULTS.md): with AVX2 or AVX-512 the kernel beats the tiled kernel at HaloNet's stages 1-3;
# built for 16-byte vectors (SSE-only x86, or NEON, not measured) it is up to 1.5x slower than the tiled kernel,
# whose GEMMs ATen dispatches at run time.
AUTO_MIN_VECTOR_BYTES = 32


@torch.compiler.assume_constant_result
def preferred() -> bool:
    """True when 'auto' should run this kernel on CPU: it is available and built for wide enough vectors."""
    return available() and _load()[torch.float32].halo_vector_bytes() >= AUTO_MIN_VECTOR_BYTES


def unavailable_reason() -> str:
    _load()
    return _error or ''


def _library(dtype: torch.dtype) -> ctypes.CDLL:
    libs = _load()
    if libs is None:
        raise RuntimeError(f"HaloAttention: attn_impl='fused' needs a C compiler to build its CPU kernel, and the "
                           f"build failed ({_error}); use attn_impl='tiled' or 'auto'")
    return libs[dtype]


def _check(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    if dtype not in DTYPES or any(t.dtype != dtype for t in tensors):
        raise TypeError(f"HaloAttention: attn_impl='fused' runs fp32 or fp64 (one dtype), got "
                        f"{sorted({str(t.dtype) for t in tensors})}; use attn_impl='tiled' or 'auto' (autocast)")
    if any(t.device.type != 'cpu' for t in tensors):
        raise RuntimeError("HaloAttention: attn_impl='fused' runs on cpu only")
    return dtype


_ERRORS = {1: (MemoryError, 'the fused CPU kernel could not allocate its scratch buffers'),
           2: (IndexError, 'a relative-table row outside the table (fused CPU kernel); please report')}


def _tables_mode(rel_h: torch.Tensor) -> bool:
    """The relative terms' source: the (rows, d) tables themselves, or each query's products with them."""
    return rel_h.dim() == 2


def _check_shapes(q, k, v, tables, *outputs) -> None:
    """The C kernel reads raw memory at offsets from these shapes: a mismatch must be an error, not a bad read."""
    rel_h, rel_w, base_h, base_w, mask_h, mask_w = tables
    n, d, num_q = q.shape
    (nh, bq), (nw, bq_w), kh, kw, dv = base_h.shape, base_w.shape, mask_h.shape[-1], mask_w.shape[-1], v.shape[1]
    rel_shapes = [(rel_h.shape[0], d), (rel_w.shape[0], d)] if _tables_mode(rel_h) else [
        (n, rel_h.shape[1], num_q), (n, rel_w.shape[1], num_q)]
    expected = [(k, (n, d, kh * kw)), (v, (n, dv, kh * kw)), (rel_h, rel_shapes[0]), (rel_w, rel_shapes[1]),
                (base_w, (nw, bq)), (mask_h, (nh, kh)), (mask_w, (nw, kw)),
                *[(t, shape) for t, shape in zip(outputs, [(n, dv, num_q), (n, num_q, 2), (n, dv, num_q)])]]
    bad = [f'{list(t.shape)} (expected {list(shape)})' for t, shape in expected if tuple(t.shape) != shape]
    if q.dim() != 3 or bq * bq != num_q or bq_w != bq or n % (nh * nw) or bad:
        raise ValueError(f'HaloAttention: inconsistent fused-kernel operands: q {list(q.shape)}, blocks {nh} x {nw} '
                         f'of {bq} x {bq} queries; {", ".join(bad)}')
    if base_h.dtype != torch.int32 or base_w.dtype != torch.int32:
        raise TypeError(f'HaloAttention: fused-kernel table rows must be int32, got {base_h.dtype} / {base_w.dtype}')


def _run(fn, tensors, q: torch.Tensor, v: torch.Tensor, tables, scale: float, per_call=()) -> None:
    """``fn`` (the C kernel) over all windows, in ranges spread over the tile pool's threads: a few ranges per
    thread, so a thread slowed by another process hands its share to the others. ``per_call``: indices into
    ``tensors`` of outputs shaped (calls, ...) of which each call gets its own slice."""
    rel_h, rel_w, base_h, base_w, mask_h, mask_w = tables
    n, d, num_q = q.shape
    geometry = torch.tensor([d, v.shape[1], num_q, mask_h.shape[1], mask_w.shape[1], rel_h.shape[-2],
                             rel_w.shape[-2], base_h.shape[0], base_w.shape[0], base_h.shape[1],
                             int(_tables_mode(rel_h))], dtype=torch.int32)
    ptrs = [t.data_ptr() for t in (geometry, *tensors)]
    chunk = _chunk(n)

    def run(start: int, stop: int) -> None:
        args = list(ptrs)
        for index in per_call:
            t = tensors[index]
            args[index + 1] = t[start // chunk].data_ptr()
        status = fn(start, stop, args[0], scale, *args[1:])
        if status:
            kind, message = _ERRORS[status]
            raise kind(f'HaloAttention: {message}')

    run_tiles(run, n, chunk)


def _chunk(n: int) -> int:
    return max(1, -(-n // (8 * torch.get_num_threads())))


def _forward(q, k, v, tables, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    lib = _library(_check(q, k, v, *tables[:2], *tables[4:]))
    _check_shapes(q, k, v, tables)
    q, k, v, *tables = (t.contiguous() for t in (q, k, v, *tables))
    n, _, num_q = q.shape
    out, stats = q.new_empty(n, v.shape[1], num_q), q.new_empty(n, num_q, 2)  # per query: max logit, 1 / sum of exp
    _run(lib.halo_fwd, (q, k, v, *tables, out, stats), q, v, tables, scale)
    return out, stats


def _backward(grad_out, q, k, v, tables, out, stats, scale: float):
    lib = _library(_check(grad_out, q, k, v, *tables[:2], *tables[4:], out, stats))
    _check_shapes(q, k, v, tables, out, stats, grad_out)
    q, k, v, *tables = (t.contiguous() for t in (q, k, v, *tables))
    out, stats, grad_out = out.contiguous(), stats.contiguous(), grad_out.contiguous()
    grads = [t.new_empty(t.shape) for t in (q, k, v)]  # contiguous (the kernel's layout)
    if _tables_mode(tables[0]):  # one table gradient per call of the kernel, summed here
        calls = -(-q.shape[0] // _chunk(q.shape[0]))
        rel_grads = [t.new_zeros(calls, *t.shape) for t in tables[:2]]
        per_call = (15, 16)  # their indices in the kernel's tensors below
    else:
        rel_grads, per_call = [t.new_empty(t.shape) for t in tables[:2]], ()
    _run(lib.halo_bwd, (q, k, v, *tables, out, stats, grad_out, *grads, *rel_grads), q, v, tables, scale, per_call)
    if per_call:
        rel_grads = [g.sum(0) for g in rel_grads]
    return (*grads, *rel_grads)


@torch.library.custom_op('timm_halo::attend_fused', mutates_args=())
def _attend_fused(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qt_h: torch.Tensor, qt_w: torch.Tensor,
        base_h: torch.Tensor, base_w: torch.Tensor, mask_h: torch.Tensor, mask_w: torch.Tensor, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, (qt_h, qt_w, base_h, base_w, mask_h, mask_w), scale)


@_attend_fused.register_fake
def _attend_fused_fake(q, k, v, qt_h, qt_w, base_h, base_w, mask_h, mask_w, scale):
    return q.new_empty(q.shape[0], v.shape[1], q.shape[2]), q.new_empty(q.shape[0], q.shape[2], 2)


# The backward is an op of its own, so that compiled graphs call the kernel (inductor sees one opaque node).
@torch.library.custom_op('timm_halo::attend_fused_backward', mutates_args=())
def _attend_fused_backward(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qt_h: torch.Tensor,
        qt_w: torch.Tensor, base_h: torch.Tensor, base_w: torch.Tensor, mask_h: torch.Tensor, mask_w: torch.Tensor,
        out: torch.Tensor, stats: torch.Tensor, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_out, q, k, v, (qt_h, qt_w, base_h, base_w, mask_h, mask_w), out, stats, scale)


@_attend_fused_backward.register_fake
def _attend_fused_backward_fake(grad_out, q, k, v, qt_h, qt_w, base_h, base_w, mask_h, mask_w, out, stats, scale):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, qt_h, qt_w))  # contiguous, as the kernel writes them


def _setup_context(ctx, inputs, output) -> None:
    *tensors, scale = inputs
    out, stats = output
    ctx.save_for_backward(*tensors, out, stats)
    ctx.mark_non_differentiable(stats)
    ctx.scale = scale


def _autograd(ctx, grad_out, _grad_stats):
    q, k, v, qt_h, qt_w, base_h, base_w, mask_h, mask_w, out, stats = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiable recomputation (double backward)
        def recompute(q, k, v, qt_h, qt_w):
            return attend_broadcast(q, k, v, *expand_tables(q, qt_h, qt_w, base_h, base_w, mask_h, mask_w), ctx.scale)

        grads = differentiable_backward(grad_out, (q, k, v, qt_h, qt_w), recompute)
    else:
        grads = _attend_fused_backward(grad_out, q, k, v, qt_h, qt_w, base_h, base_w, mask_h, mask_w, out, stats,
                                       ctx.scale)
    return *grads, None, None, None, None, None


_attend_fused.register_autograd(_autograd, setup_context=_setup_context)


def expand_tables(
        q: torch.Tensor, qt_h: torch.Tensor, qt_w: torch.Tensor, base_h: torch.Tensor, base_w: torch.Tensor,
        mask_h: torch.Tensor, mask_w: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The per-axis relative terms (rel_h, rel_w of ``attend_broadcast``) that ``attend_fused_tables`` builds from
    its sources (tables, or each query's products with them), in plain ops (the kernel's double backward, tests)."""
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


def _widened(*tensors: torch.Tensor) -> Tuple[Tuple[torch.Tensor, ...], Optional[torch.dtype]]:
    """The kernel computes in fp32 or fp64: other float dtypes (bf16/fp16 under autocast) are widened to fp32, and
    the result is cast back to the returned dtype."""
    dtype = tensors[0].dtype
    if dtype in DTYPES and all(t.dtype == dtype for t in tensors):
        return tensors, None
    wide = torch.promote_types(torch.promote_types(*(t.dtype for t in tensors[:2])), torch.float32)
    return tuple(t.to(wide) for t in tensors), tensors[2].dtype


def attend_fused_tables(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qt_h: torch.Tensor, qt_w: torch.Tensor,
        base_h: torch.Tensor, base_w: torch.Tensor, mask_h: torch.Tensor, mask_w: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Fused windowed attention (CPU) that builds each query's relative terms from the relative tables.

    Args:
        q, k, v, scale: as ``attend_broadcast``; windows ordered (batch x heads, block row, block column).
        qt_h, qt_w: the height / width tables themselves, (rows, d), whose products with q the kernel takes; or
            each query's products with every row of them, (N, rows, bq * bq).
        base_h, base_w: (blocks along H, bq) / (blocks along W, bq) int32: the table row of key row / column 0 for
            each block and query row / column; key row jh reads row ``base + jh``.
        mask_h, mask_w: (blocks along H, kh) / (blocks along W, kw) additive border masks.

    Returns:
        (N, dv, bq * bq)
    """
    (q, k, v, qt_h, qt_w, mask_h, mask_w), cast = _widened(q, k, v, qt_h, qt_w, mask_h, mask_w)
    out = _attend_fused(q, k, v, qt_h, qt_w, base_h.to(torch.int32), base_w.to(torch.int32), mask_h, mask_w,
                        scale)[0]
    return out if cast is None else out.to(cast)


def attend_fused(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Fused windowed attention (CPU) with the kernel interface of ``attend_broadcast``: the per-axis terms are
    given whole (one table row per key row and query: base 0, no mask)."""
    n, bq, _, kh = rel_h.shape
    kw = rel_w.shape[-1]
    zeros = torch.zeros(1, bq, dtype=torch.int32, device=q.device)
    return attend_fused_tables(q, k, v, rel_h.reshape(n, bq * bq, kh).transpose(1, 2),
                               rel_w.reshape(n, bq * bq, kw).transpose(1, 2), zeros, zeros,
                               rel_h.new_zeros(1, kh), rel_w.new_zeros(1, kw), scale)
