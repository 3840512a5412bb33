"""Which attention kernel runs a call: one registry, each kernel saying why it cannot run a given call, and the
layers' per-call choice (``KernelChoice``). How it works and how to add a kernel: docs/kernels.md."""
import os
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from . import fused_cpu
from .broadcast import attend_broadcast
from .sdpa import attend_sdpa
from .tiled import TILE_LOGITS, attend_tiled

__all__ = ['ATTN_IMPLS', 'ATTN_IMPL_ENV', 'AUTO_ORDER', 'Call', 'Kernel', 'KernelChoice', 'choose', 'resolve_impl_name']

ATTN_IMPL_ENV = 'TIMM_HALO_ATTN_IMPL'


class Call(NamedTuple):
    """What decides the kernel, computed once per call."""
    device: str  # the input's device type
    dtype: torch.dtype
    traced: bool  # TorchScript, tracing or export: plain ATen ops, one graph for every input size
    plain_autograd: bool  # forward-mode AD or a torch.func transform: custom ops have no rules there
    logits: int  # logits of the whole call (windows x queries x keys)


def _can(call: Call) -> Optional[str]:
    return None


class Kernel(NamedTuple):
    attend: Callable[..., torch.Tensor]  # (q, k, v, rel_h, rel_w, scale), see attend_broadcast
    why_not: Callable[[Call], Optional[str]]  # why it cannot run a call (None: it can)
    auto_skip: Callable[[Call], Optional[str]] = _can  # why 'auto' passes it over although it could run


def _cpu_custom_op(name: str) -> Callable[[Call], Optional[str]]:
    def why_not(call: Call) -> Optional[str]:
        if call.device != 'cpu':
            return f"attn_impl='{name}' runs on cpu only, got a {call.device} input; use attn_impl='auto'"
        if call.traced:
            return (f"attn_impl='{name}' is a custom op that tracing and export cannot capture; use attn_impl='auto' "
                    "(exports the 'broadcast' path) or 'broadcast'")
        if name == 'fused' and not fused_cpu.available():
            return (f"attn_impl='fused' builds a C kernel on first use, and that failed "
                    f"({fused_cpu.unavailable_reason()}); use attn_impl='auto' (runs 'tiled' then) or 'tiled'")
        if call.plain_autograd:
            return (f"attn_impl='{name}' is a custom op without forward-mode AD or torch.func rules (its tangents "
                    "would be wrong); use attn_impl='auto' or 'broadcast' for jvp/jacfwd/vmap")
        return None
    return why_not


def _fused_auto_skip(call: Call) -> Optional[str]:
    # Measured (benchmarks/RESULTS.md): with AVX2 or AVX-512 the C kernel beats the tiled kernel at HaloNet's stages
    # 1-3 and is on a par at stage 4; with 16-byte vectors it is slower. Other CPUs never compile it for 'auto'.
    return None if fused_cpu.preferred() else 'no AVX2 / AVX-512 build of the C kernel here'


def _tiled_auto_skip(call: Call) -> Optional[str]:
    # All logits fit in one tile (late stages, small batches): tiling buys nothing, one whole-tensor call is faster.
    # Not asked where the kernel cannot run: an exporter would guard the (symbolic) batch size on the comparison.
    fits = not (call.traced or call.plain_autograd) and call.logits <= TILE_LOGITS
    return 'the call fits in one tile' if fits else None


def _sdpa_auto_skip(call: Call) -> Optional[str]:
    if call.traced or call.plain_autograd:
        return 'tracing, export, forward-mode AD and torch.func keep plain ops'
    if call.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return 'no fused CUDA kernel for this dtype (SDPA would run its math backend)'
    return None


KERNELS: Dict[str, Kernel] = {  # functions looked up per call, so that tests can wrap them
    # C kernel built on first use (fused_cpu.py); 'auto' on CPUs with AVX2 / AVX-512
    'fused': Kernel(lambda *args: fused_cpu.attend_fused(*args), _cpu_custom_op('fused'), _fused_auto_skip),
    # tiled flash-style CPU kernel in ATen ops (tiled.py); 'auto' on CPU without the C kernel
    'tiled': Kernel(lambda *args: attend_tiled(*args, TILE_LOGITS), _cpu_custom_op('tiled'), _tiled_auto_skip),
    # fused scaled_dot_product_attention calls (sdpa.py); 'auto' on CUDA; first-order gradients
    'sdpa': Kernel(lambda *args: attend_sdpa(*args), _can, _sdpa_auto_skip),
    # whole tensors in plain ATen ops (broadcast.py): every device, autograd mode and exporter
    'broadcast': Kernel(lambda *args: attend_broadcast(*args), _can),
}
ATTN_IMPLS = KERNELS  # the public name
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {'cpu': ('fused', 'tiled', 'broadcast'), 'cuda': ('sdpa', 'broadcast')}
_IMPL_NAMES = ('auto', *KERNELS)


def resolve_impl_name(attn_impl: Optional[str]) -> str:
    """``attn_impl``, else ``$TIMM_HALO_ATTN_IMPL``, else ``'auto'``; an unknown name is a ValueError."""
    name = attn_impl if attn_impl is not None else (os.environ.get(ATTN_IMPL_ENV, '').strip() or 'auto')
    if name not in _IMPL_NAMES:
        source = 'attn_impl' if attn_impl is not None else f'the environment variable {ATTN_IMPL_ENV}'
        raise ValueError(f'HaloAttention: unknown {source} {name!r}; choose one of {", ".join(_IMPL_NAMES)}')
    return name


def choose(attn_impl: str, call: Call, owner: str = 'HaloAttention') -> str:
    """The kernel that runs ``call``: ``attn_impl`` itself (an error with its reason if it cannot), or for
    ``'auto'`` the first of ``AUTO_ORDER[call.device]`` that can and is not passed over."""
    if attn_impl == 'auto':
        for name in AUTO_ORDER.get(call.device, ('broadcast',)):
            kernel = KERNELS[name]
            if kernel.auto_skip(call) is None and kernel.why_not(call) is None:  # skip first: it never compiles
                return name
        return 'broadcast'
    reason = KERNELS[attn_impl].why_not(call)
    if reason is not None:
        raise RuntimeError(f'{owner}: {reason}')
    return attn_impl


@torch.jit.unused
def _plain_autograd_required() -> bool:
    """True inside forward-mode AD (``torch.autograd.forward_ad``) or a ``torch.func`` transform (jvp, jacfwd,
    grad, vmap, ...): custom ops have no rules there (forward AD would silently get a zero tangent)."""
    if torch.compiler.is_compiling():  # dynamo traces transforms itself
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None or torch.autograd.forward_ad._current_level >= 0


# Under dynamo, torch 2.7-2.11 fold torch.compiler.is_exporting() to True (torch.compile included); called through
# assume_constant_result, the real flag is read once at trace time instead and kept as the graph's constant.
_export_flag_at_trace_time = torch.compiler.assume_constant_result(
    lambda: bool(getattr(torch.compiler, 'is_exporting', lambda: False)()))


@torch.jit.unused
def _exporting() -> bool:
    """True while torch.export (strict or not) or the ONNX exporter trace the layer (docs/kernels.md, Where the
    choice is made); torch.compile keeps the fast kernels."""
    if torch.compiler.is_dynamo_compiling():  # torch.compile, or a strict torch.export
        return _export_flag_at_trace_time()
    # torch.export's own flag (torch 2.7+, also set under the ONNX exporter); older torch has none, and there the
    # compiling flag outside dynamo is set by its non-strict export alone.
    is_exporting = getattr(torch.compiler, 'is_exporting', None)
    return is_exporting() if is_exporting is not None else torch.compiler.is_compiling()


class KernelChoice:
    """The kernel choice of a layer (``HaloAttention``, ``TimmHaloAttn``), once per call. The layer has ``attn_impl``,
    ``scale``, ``heads``, ``block_size``, ``stride`` (query subsampling inside a block) and ``_window_plan``."""

    def _use_custom_kernels(self) -> bool:
        """Eager mode and torch.compile: size-dependent window plans (cropped windows) and custom ops are allowed.
        TorchScript, tracing and export keep plain ops and windows, so one graph serves every input size."""
        return not (torch.jit.is_scripting() or torch.jit.is_tracing()) and self._not_exporting()

    @torch.jit.unused
    def _not_exporting(self) -> bool:
        return not _exporting()

    def _call_plan(self, x: torch.Tensor) -> Tuple[str, bool, bool, bool]:
        """For this call: the kernel, whether windows are cut by the ``gather_windows`` op, whether cropped windows
        are allowed, and whether a traced or exported graph is built (it gets the ops ONNX Runtime runs fast)."""
        if torch.jit.is_scripting():
            return 'broadcast', False, False, False
        return self._choose(x)

    @torch.jit.unused
    def _choose(self, x: torch.Tensor) -> Tuple[str, bool, bool, bool]:
        custom = self._use_custom_kernels()
        # An export of one input size (height and width plain ints, not symbolic) also gets cropped windows: its
        # graph serves that size only (an ONNX model of 256 px runs stage 4's 8x8 maps on 64 keys, not 196).
        crop = custom or (not torch.jit.is_tracing() and all(isinstance(n, int) for n in x.shape[-2:]))
        plain_autograd = _plain_autograd_required()
        call = Call(x.device.type, x.dtype, not custom, plain_autograd, self._call_logits(x, crop))
        return choose(self.attn_impl, call, type(self).__name__), custom and not plain_autograd, crop, not custom

    @torch.jit.unused
    def _call_logits(self, x: torch.Tensor, crop: bool) -> int:
        B, _, H, W = x.shape
        b, bq = self.block_size, self.block_size // self.stride
        nh, nw = (H + b - 1) // b, (W + b - 1) // b
        keys = self._window_plan(H, nh, crop)[3] * self._window_plan(W, nw, crop)[3]
        return B * self.heads * nh * nw * bq * bq * keys

    def _attend(self, impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rel: List[torch.Tensor]) -> torch.Tensor:
        """``rel``: [rel_h, rel_w] (the scripted path is ``'broadcast'``)."""
        if impl == 'broadcast':
            return attend_broadcast(q, k, v, rel[0], rel[1], self.scale)
        return self._attend_kernel(impl, q, k, v, rel)

    @torch.jit.unused
    def _attend_kernel(self, impl: str, q, k, v, rel: List[torch.Tensor]) -> torch.Tensor:
        return KERNELS[impl].attend(q, k, v, rel[0], rel[1], self.scale)
