"""Fused windowed attention for CPUs: a small C kernel (``fused_cpu.c``) as ``torch.library`` custom ops.

The tiled kernel (tiled.py) makes about a dozen passes of ATen ops over each tile of logits; at HaloNet's head
widths (8-16 channels) those passes, not the arithmetic, are its cost. Here each query's row of logits is built,
normalised and consumed in an L1-resident buffer, forward and backward (flash-attention style: the forward keeps
each query's max logit and log-sum-exp, the backward recomputes the probabilities from it).

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

from .tile_pool import run_tiles
from .tiled import differentiable_backward

__all__ = ['attend_fused', 'available', 'unavailable_reason', 'DTYPES']

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
    head = [ctypes.c_int64, ctypes.c_int64] + [ctypes.c_int] * 5 + [real]
    lib.halo_fwd.argtypes = head + [ctypes.c_void_p] * 7
    lib.halo_bwd.argtypes = head + [ctypes.c_void_p] * 13
    lib.halo_fwd.restype = lib.halo_bwd.restype = ctypes.c_int
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


def available() -> bool:
    """True when the C kernel is built (or can be, on this first call) and loaded."""
    return _load() is not None


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


def _run(fn, tensors, dims, scale: float, n: int) -> None:
    """``fn`` (the C kernel) over all ``n`` windows, in ranges spread over the tile pool's threads: a few ranges
    per thread, so a thread slowed by another process hands its share to the others."""
    ptrs = [t.data_ptr() for t in tensors]
    chunk = max(1, -(-n // (8 * torch.get_num_threads())))

    def run(start: int, stop: int) -> None:
        if fn(start, stop, *dims, scale, *ptrs) != 0:
            raise MemoryError('HaloAttention: the fused CPU kernel could not allocate its scratch buffers')

    run_tiles(run, n, chunk)


def _dims(q: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor) -> Tuple[int, ...]:
    return q.shape[1], v.shape[1], q.shape[2], rel_h.shape[-1], rel_w.shape[-1]  # d, dv, Q, kh, kw


def _forward(q, k, v, rel_h, rel_w, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    lib = _library(_check(q, k, v, rel_h, rel_w))
    q, k, v, rel_h, rel_w = (t.contiguous() for t in (q, k, v, rel_h, rel_w))
    n, _, num_q = q.shape
    out, stats = q.new_empty(n, v.shape[1], num_q), q.new_empty(n, num_q, 2)  # per query: max, log-sum-exp
    _run(lib.halo_fwd, (q, k, v, rel_h, rel_w, out, stats), _dims(q, v, rel_h, rel_w), scale, n)
    return out, stats


def _backward(grad_out, q, k, v, rel_h, rel_w, out, stats, scale: float):
    lib = _library(_check(grad_out, q, k, v, rel_h, rel_w, out, stats))
    inputs = tuple(t.contiguous() for t in (q, k, v, rel_h, rel_w, out, stats, grad_out))
    grads = tuple(t.new_empty(t.shape) for t in inputs[:5])  # contiguous (the kernel's layout)
    _run(lib.halo_bwd, inputs + grads, _dims(*(inputs[i] for i in (0, 2, 3, 4))), scale, q.shape[0])
    return grads


@torch.library.custom_op('timm_halo::attend_fused', mutates_args=())
def _attend_fused(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, rel_h, rel_w, scale)


@_attend_fused.register_fake
def _attend_fused_fake(q, k, v, rel_h, rel_w, scale):
    return q.new_empty(q.shape[0], v.shape[1], q.shape[2]), q.new_empty(q.shape[0], q.shape[2], 2)


# The backward is an op of its own, so that compiled graphs call the kernel (inductor sees one opaque node).
@torch.library.custom_op('timm_halo::attend_fused_backward', mutates_args=())
def _attend_fused_backward(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
        rel_w: torch.Tensor, out: torch.Tensor, stats: torch.Tensor, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_out, q, k, v, rel_h, rel_w, out, stats, scale)


@_attend_fused_backward.register_fake
def _attend_fused_backward_fake(grad_out, q, k, v, rel_h, rel_w, out, stats, scale):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, rel_h, rel_w))  # contiguous, as the kernel writes them


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, rel_h, rel_w, scale = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, rel_h, rel_w, out, stats)
    ctx.mark_non_differentiable(stats)
    ctx.scale = scale


def _autograd(ctx, grad_out, _grad_stats):
    q, k, v, rel_h, rel_w, out, stats = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiable recomputation (double backward)
        grads = differentiable_backward(grad_out, (q, k, v, rel_h, rel_w), ctx.scale)
    else:
        grads = _attend_fused_backward(grad_out, q, k, v, rel_h, rel_w, out, stats, ctx.scale)
    return *grads, None


_attend_fused.register_autograd(_autograd, setup_context=_setup_context)


def attend_fused(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Fused windowed attention (CPU): arguments and result as ``attend_broadcast``. The kernel computes in fp32
    or fp64; other dtypes (bf16/fp16 under autocast) are computed in fp32 and the result cast back."""
    dtype = torch.promote_types(q.dtype, v.dtype)
    if dtype in DTYPES and all(t.dtype == dtype for t in (q, k, v, rel_h, rel_w)):
        return _attend_fused(q, k, v, rel_h, rel_w, scale)[0]
    wide = torch.promote_types(dtype, torch.float32)
    out = _attend_fused(*(t.to(wide) for t in (q, k, v, rel_h, rel_w)), scale)[0]
    return out.to(v.dtype)
