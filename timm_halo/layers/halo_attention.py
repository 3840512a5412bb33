"""Blocked local self-attention with a halo (HaloNet, https://arxiv.org/abs/2103.12731); docs/kernels.md."""
# The layer cuts its input into query blocks and key windows and hands them to one kernel of kernels.KERNELS;
# reference_forward is dense attention with an explicit window mask, which the tests hold every kernel to. The maths,
# masking and stride: docs/kernels.md (The layer's attention).
import math
import numbers
from typing import List, Optional, Tuple

import torch
from einops import rearrange
from timm.layers import register_notrace_function, register_notrace_module, trunc_normal_
from torch import nn

from .broadcast import attend_augmented
from .fused_cpu import attend_fused_maps
from .kernels import KernelChoice, resolve_impl_name
from .sdpa import autocast_dtype
from .windows import blocks_to_map, gather_windows, map_to_blocks, pad_map, unfold_windows

__all__ = ['HaloAttention', 'check_image_input', 'check_int']


@torch.jit.unused
def _check_dtype(x: torch.Tensor, param_dtype: torch.dtype, owner: str) -> None:
    # PyTorch reports this deep inside a convolution ("expected scalar type Double but found Float"); name the
    # module and both dtypes instead. Under autocast a mismatch is the normal case (bf16 activations meet fp32
    # parameters), so only complain outside it.
    if x.dtype != param_dtype and autocast_dtype(x.device.type) is None:
        raise TypeError(
            f'{owner} got a {x.dtype} input but its parameters are {param_dtype}: convert the input '
            f'(x.to({param_dtype})) or the module (.to({x.dtype})), or run under torch.autocast')


@register_notrace_function  # a leaf for torch.fx: the checks need real shapes, not proxies
def check_image_input(x: torch.Tensor, channels: int, param_dtype: torch.dtype, owner: str) -> None:
    """Raise a clear error unless ``x`` is 4-D NCHW floating point with ``channels`` channels, the parameters' dtype."""
    # (any dtype under autocast)
    if x.dim() != 4:
        raise ValueError(f'{owner} expects a 4-D NCHW tensor, got {x.dim()}-D of shape {list(x.shape)}')
    if x.shape[1] != channels:
        raise ValueError(
            f'{owner} was built for {channels} input channels, got {x.shape[1]} (input shape {list(x.shape)})')
    if x.shape[2] == 0 or x.shape[3] == 0:  # else a conv complains that its kernel exceeds the padded input
        raise ValueError(f'{owner} needs a non-empty image, got H x W = {x.shape[2]} x {x.shape[3]}')
    if not x.is_floating_point():
        raise TypeError(f'{owner} expects a floating point input, got {x.dtype}')
    if not torch.jit.is_scripting():
        _check_dtype(x, param_dtype, owner)


def check_int(owner: str, name: str, value, lowest: int, hint: str = '') -> None:
    """``value`` must be an integer (not a bool) >= ``lowest``: TypeError for another type, ValueError below it."""
    hint = f' ({hint})' if hint else ''
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f'{owner}: {name} must be an integer >= {lowest}{hint}, got {value!r} of type '
                        f'{type(value).__name__}')
    if value < lowest:
        raise ValueError(f'{owner}: {name} must be an integer >= {lowest}{hint}, got {value!r}')


@register_notrace_module  # a leaf for torch.fx feature extraction: its shape arithmetic is not symbolic
class HaloAttention(KernelChoice, nn.Module):
    """Halo attention: blocked local self-attention with 2-D relative positions. NCHW in, NCHW out.

    Args:
        dim: input channels.
        block_size: query block side b.
        halo_size: halo h around each block; the key window side is b + 2h.
        dim_head: query/key channels per head.
        heads: number of attention heads.
        dim_out: output channels (default ``dim``). If it differs from ``heads * dim_head * value_ratio``
            a 1x1 output projection is added (as in lucidrains' halonet-pytorch); otherwise none.
        stride: 1, or 2 for strided attention (queries subsampled inside each block).
        value_ratio: value channels per head relative to ``dim_head`` (the paper's rv).
        qkv_bias: add a bias to the q and kv projections.
        attn_impl: the kernel, ``'auto'``, ``'fused'``, ``'tiled'``, ``'sdpa'`` or ``'broadcast'`` (docs/kernels.md);
            ``None`` reads the environment variable ``TIMM_HALO_ATTN_IMPL``, else ``'auto'``.
    """
    def __init__(self, dim: int, block_size: int = 8, halo_size: int = 3, dim_head: int = 64, heads: int = 8,
                 dim_out: Optional[int] = None, stride: int = 1, value_ratio: float = 1.0, qkv_bias: bool = False,
                 attn_impl: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        dim_out = dim if dim_out is None else dim_out
        for name, value, lowest in (('dim', dim, 1), ('block_size', block_size, 1), ('halo_size', halo_size, 0),
                                    ('dim_head', dim_head, 1), ('heads', heads, 1), ('dim_out', dim_out, 1)):
            check_int('HaloAttention', name, value, lowest)
        check_int('HaloAttention', 'stride', stride, 1, '1 or 2')
        if stride not in (1, 2):
            raise ValueError(f'HaloAttention: stride must be 1 or 2, got {stride!r}')
        if block_size % stride:
            raise ValueError(f'HaloAttention: block_size ({block_size}) must be divisible by stride ({stride}) '
                             'so that every block keeps the same number of queries')
        if isinstance(value_ratio, bool) or not isinstance(value_ratio, numbers.Real):
            raise TypeError(f'HaloAttention: value_ratio must be a finite number > 0, got {value_ratio!r} of type '
                            f'{type(value_ratio).__name__}')
        if not math.isfinite(value_ratio) or value_ratio <= 0:
            raise ValueError(f'HaloAttention: value_ratio must be a finite number > 0, got {value_ratio!r}')
        dim_head_v = int(round(dim_head * value_ratio))
        if dim_head_v < 1:
            raise ValueError(
                f'HaloAttention: value_ratio {value_ratio!r} leaves no value channels (dim_head {dim_head})')
        if not isinstance(qkv_bias, bool):  # 'no' would be truthy: biases the caller did not ask for
            raise TypeError(f'HaloAttention: qkv_bias must be True or False, got {qkv_bias!r}')
        stride, value_ratio = int(stride), float(value_ratio)  # numpy scalars: plain numbers for scripting

        self.dim, self.dim_out, self.heads, self.dim_head, self.dim_head_v = dim, dim_out, heads, dim_head, dim_head_v
        self.block_size, self.halo_size, self.win_size = block_size, halo_size, block_size + 2 * halo_size
        self.stride = stride
        self.scale = dim_head ** -0.5
        self.attn_impl = resolve_impl_name(attn_impl)

        self.q = nn.Conv2d(dim, heads * dim_head, 1, bias=qkv_bias, **dd)
        self.kv = nn.Conv2d(dim, heads * (dim_head + dim_head_v), 1, bias=qkv_bias, **dd)
        # One entry per possible offset between a query and a key of its window, centred on offset 0.
        num_rel = 2 * (block_size + halo_size) - 1
        self.rel_pos_h = nn.Parameter(torch.empty(num_rel, dim_head, **dd))
        self.rel_pos_w = nn.Parameter(torch.empty(num_rel, dim_head, **dd))
        inner_v = heads * dim_head_v
        self.proj = nn.Conv2d(inner_v, dim_out, 1, **dd) if inner_v != dim_out else nn.Identity()

        self.reset_parameters()

    def reset_parameters(self) -> None:
        trunc_normal_(self.q.weight, std=self.dim ** -0.5)
        trunc_normal_(self.kv.weight, std=self.dim ** -0.5)
        trunc_normal_(self.rel_pos_h, std=self.scale)
        trunc_normal_(self.rel_pos_w, std=self.scale)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, dim_out={self.dim_out}, heads={self.heads}, dim_head={self.dim_head}, '
    f'dim_head_v={self.dim_head_v}, block_size={self.block_size}, halo_size={self.halo_size}, '
                f'stride={self.stride}, attn_impl={self.attn_impl!r}')

    def _check_input(self, x: torch.Tensor) -> None:
        # rel_pos_h, not q.weight: q may be wrapped or replaced (PEFT, quantisation) and have no weight
        check_image_input(x, self.dim, self.rel_pos_h.dtype, 'HaloAttention')

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """Spatial size of the output for an input of ``height x width``."""
        # Written as a strided convolution's size, (n - 1) // s + 1: torch.compile's symbolic shapes then see the
        # same expression as a model's strided shortcut and can add the two (it cannot prove (n + 1) // 2 equal to
        # it, and would specialise the size). n >= 1, so the ONNX exporter's truncating Div is exact too.
        return (height - 1) // self.stride + 1, (width - 1) // self.stride + 1

    # ---- blocks and windows -------------------------------------------------------------------------------------

    def _window_plan(self, size: int, blocks: int, crop: bool) -> Tuple[int, int, int, int]:
        """Key windows along one axis: (padding before, padding after, step, length)."""
        # crop: shorter windows on maps of one or two blocks, without the halo rows outside the image (docs/kernels.md,
        # Cropped key windows)
        b, h = self.block_size, self.halo_size
        if crop and blocks == 1:
            return 0, 0, b, size  # the whole axis is one window
        if crop and blocks == 2 and h < b:
            # block 0 sees rows [0, b + h), block 1 rows [b - h, size) with b < size <= 2b: windows of b + h rows
            # cover both (padded after by 2b - size >= 0; a constant length keeps torch.compile's graph general)
            return 0, 2 * b - size, b - h, b + h
        return h, blocks * b + h - size, b, b + 2 * h

    def _axis_terms(self, size: int, blocks: int, plan: Tuple[int, int, int, int], dtype: torch.dtype,
                    device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Table rows (blocks, bq, length) per (block, query, key) and the border mask (blocks, length)."""
        # the mask is 0 where the key lies inside the image and inside the block's halo window
        b, h, s = self.block_size, self.halo_size, self.stride
        pad_before, _, step, length = plan
        block_start = (torch.arange(blocks, device=device) * b)[:, None]
        key_pos = (torch.arange(blocks, device=device) * step - pad_before)[:, None] + torch.arange(
            length, device=device)
        visible = (key_pos >= 0) & (key_pos < size) & (key_pos >= block_start - h) & (key_pos < block_start + b + h)
        query_pos = block_start + torch.arange(0, b, s, device=device)
        # Invisible keys may have offsets beyond the table: clamp them to a valid row, the mask removes them.
        rows = (key_pos[:, None, :] - query_pos[:, :, None] + b + h - 1).clamp(0, 2 * (b + h - 1))
        # A row mask and a column mask can both hit one logit: a quarter of the dtype's lowest finite value
        # keeps their sum (plus any real logit) finite in fp16/bf16/fp32. nan_to_num gives that value in a
        # TorchScript-friendly way (torch.finfo is not scriptable).
        masked = torch.full((), float('-inf'), dtype=dtype, device=device).nan_to_num() / 4
        return rows, torch.where(visible, torch.zeros_like(masked), masked)

    def _axis(self, size: int, crop: bool, dtype: torch.dtype, device: torch.device,
              ) -> Tuple[int, Tuple[int, int, int, int], torch.Tensor, torch.Tensor]:
        """One axis: its blocks (ceil division without negatives, see output_size), window plan, table rows, mask."""
        blocks = (size + self.block_size - 1) // self.block_size
        blocks = _concrete_if_small(blocks) if crop else blocks
        plan = self._window_plan(size, blocks, crop)
        if torch.jit.is_scripting():
            rows, mask = self._axis_terms(size, blocks, plan, dtype, device)
        else:
            rows, mask = self._kept_axis_terms(size, blocks, plan, dtype, device)
        return blocks, plan, rows, mask

    def _project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The q map (at the query stride) and the kv map."""
        # Called as modules: hooks, wrappers (LoRA, pruning, quantisation) all apply.
        s = self.stride
        return self.q(x[:, :, ::s, ::s] if s > 1 else x), self.kv(x)

    def _blocked(self, x: torch.Tensor, crop: bool, gather_op: bool,
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[torch.Tensor], List[int]]:
        """q, k, v, [rel_h, rel_w] as ``attend_broadcast`` takes them, and the geometry for ``_unblock``."""
        # q (N, d, bq^2), k (N, d, kh * kw), v (N, dv, kh * kw), N = B * heads * nh * nw (docs/kernels.md, Blocks and
        # windows)
        B, _, H, W = x.shape
        bq = self.block_size // self.stride
        q, kv = self._project(x)
        nh, plan_h, rows_h, mask_h = self._axis(H, crop, q.dtype, x.device)
        nw, plan_w, rows_w, mask_w = self._axis(W, crop, q.dtype, x.device)
        # Padded from q's own size (a slice's size expression differs from output_size's), so the padded axes are
        # exactly nh * bq and nw * bq for symbolic shapes too; one contiguous copy, shared with the relative terms.
        q = map_to_blocks(q.reshape(B * self.heads, self.dim_head, q.shape[2], q.shape[3]), bq, nh, nw, crop)
        # Relative logits per axis: q . table[offset] for each (query row, key row) pair of each block.
        q_blocks = q.view(B, self.heads, nh, nw, self.dim_head, bq, bq)
        rel_h = torch.einsum('bnhwdyx,hykd->bnhwyxk', q_blocks, self.rel_pos_h[rows_h])
        rel_w = torch.einsum('bnhwdyx,wxkd->bnhwyxk', q_blocks, self.rel_pos_w[rows_w])
        # The border mask is separable too, so it rides on the per-axis terms.
        rel_h = (rel_h + mask_h[:, None, None, None, :]).reshape(q.shape[0], bq, bq, plan_h[3])
        rel_w = (rel_w + mask_w[:, None, None, :]).reshape(q.shape[0], bq, bq, plan_w[3])
        padded = pad_map(kv, [plan_w[0], plan_w[1], plan_h[0], plan_h[1]], crop)
        k, v = cut_windows(padded, self.heads, self.dim_head, plan_h, plan_w, gather_op)
        hq, wq = self.output_size(H, W)
        return q, k, v, [rel_h, rel_w], [nh, nw, hq, wq]

    @torch.jit.unused
    def _graph_forward(self, x: torch.Tensor, crop: bool) -> torch.Tensor:
        """Traced and exported graphs ('broadcast'): ``attend_augmented`` on queries that carry their relative terms,
        in the ops ONNX Runtime runs fast (docs/kernels.md, Exported graphs)."""
        B, _, H, W = x.shape
        q, kv = self._project(x)
        nh, plan_h, rows_h, mask_h = self._axis(H, crop, q.dtype, x.device)
        nw, plan_w, rows_w, mask_w = self._axis(W, crop, q.dtype, x.device)
        # A graph of one input size leaves out a mask that hides nothing.
        masks = [None if self._sees_only_visible_keys(size, blocks, plan) else mask
                 for size, blocks, plan, mask in ((H, nh, plan_h, mask_h), (W, nw, plan_w, mask_w))]
        # Maps of one block take the per-block form too: in the other, merging the batch with the query positions
        # would ask whether the batch is 1 (the copy it needs is a view then), and an export from a batch of 1 would
        # lose its dynamic batch.
        same = plan_h[2] == self.block_size and plan_w[2] == self.block_size and not _one_block(nh, nw)
        queries = self._augmented_queries(q, nh, nw, rows_h, rows_w, masks[0], masks[1], same, crop)
        # channels last, as the queries
        padded = pad_map(channels_last(kv), [0, 0, plan_w[0], plan_w[1], plan_h[0], plan_h[1]], crop)
        k, v = unfold_windows(padded, self.heads, self.dim_head, plan_h[2], plan_h[3], plan_w[2], plan_w[3], True)
        hq, wq = self.output_size(H, W)
        return self._unblock(attend_augmented(queries, k, v, plan_h[3], plan_w[3]), [nh, nw, hq, wq], True)

    @torch.jit.unused
    def _augmented_queries(self, q: torch.Tensor, nh: int, nw: int, rows_h: torch.Tensor, rows_w: torch.Tensor,
                           mask_h: Optional[torch.Tensor], mask_w: Optional[torch.Tensor], same: bool,
                           skip_empty: bool) -> torch.Tensor:
        """[scale q, rel_h (+ mask_h), rel_w (+ mask_w)] per query, (N, bq^2, d + kh + kw), from the q map: one matrix
        product per query position with [scale I, table_h[rows]^T, table_w[rows]^T] (parameters only: ONNX Runtime
        folds it into a constant). ``same``: all windows b apart, one such matrix for every block."""
        d, bq, heads = self.dim_head, self.block_size // self.stride, self.heads
        B = q.shape[0]
        G = B * heads
        kh, kw = rows_h.shape[-1], rows_w.shape[-1]
        pad = [0, nw * bq - q.shape[3], 0, nh * bq - q.shape[2]]
        if same:
            # Channels last first: ONNX Runtime writes the projection's output in that layout at no cost, and the
            # block permute below then moves whole pixels.
            q = pad_map(channels_last(q), [0, 0] + pad, skip_empty).reshape(B, nh, bq, nw, bq, heads, d)
            rows_h, rows_w = rows_h[:1], rows_w[:1]
        else:
            # (small maps) images and heads merged first, in the projection's own layout: merging them after a
            # permute would ask whether the batch is 1 (an export from a batch of 1 would lose its dynamic batch)
            q = pad_map(q.reshape(G, d, q.shape[2], q.shape[3]), pad, skip_empty).reshape(G, d, nh, bq, nw, bq)
        table_h = self.rel_pos_h[rows_h].transpose(-1, -2)  # (blocks or 1, bq, d, kh)
        table_w = self.rel_pos_w[rows_w].transpose(-1, -2)
        bh, bw = table_h.shape[0], table_w.shape[0]
        eye = torch.eye(d, dtype=table_h.dtype, device=table_h.device) * self.scale
        weights = torch.cat([eye.expand(bh, bw, bq, bq, d, d),
                             table_h[:, None, :, None].expand(bh, bw, bq, bq, d, kh),
                             table_w[None, :, None, :].expand(bh, bw, bq, bq, d, kw)], -1)
        width = d + kh + kw
        mask = None
        if mask_h is not None or mask_w is not None:
            dd = {'dtype': q.dtype, 'device': q.device}
            mask_h = mask_h if mask_h is not None else torch.zeros(nh, kh, **dd)
            mask_w = mask_w if mask_w is not None else torch.zeros(nw, kw, **dd)
            mask = torch.cat([torch.zeros(nh, nw, d, **dd), mask_h[:, None].expand(nh, nw, kh),
                              mask_w[None].expand(nh, nw, kw)], -1)
        if same:
            # query position first, then image: a product per (position, image) over every block and head, and a
            # (bq^2, G * nh * nw, width) result whose transpose ONNX Runtime folds into the logits' product. The
            # batch stays out of the products' row count (torch 2.11's export would guard on it) and out of
            # broadcasting (matmul's would ask whether it is 1).
            queries = q.permute(2, 4, 0, 5, 1, 3, 6).reshape(bq * bq * B, heads * nh * nw, d)
            out = queries @ weights.view(bq * bq, 1, d, width).repeat(1, B, 1, 1).view(bq * bq * B, d, width)
            out = out.view(bq * bq, G, nh * nw, width)
            if mask is not None:
                out = out + mask.view(nh * nw, width)
            return out.view(bq * bq, G * nh * nw, width).transpose(0, 1)
        # per block too (cropped windows of maps of one or two blocks): a product per (block, position)
        out = q.permute(2, 4, 3, 5, 0, 1) @ weights  # (nh, nw, bq, bq, G, width)
        if mask is not None:
            out = out + mask[:, :, None, None, None]
        return out.permute(4, 0, 1, 2, 3, 5).reshape(G * nh * nw, bq * bq, width)

    @torch.jit.unused
    def _sees_only_visible_keys(self, size: int, blocks: int, plan: Tuple[int, int, int, int]) -> bool:
        """Whether ``_axis_terms``' mask is all zeros: every window inside the image and its block's halo window.
        False for a symbolic size (a dynamic-size export keeps the mask) and under dynamo, whose isinstance calls a
        symbolic size an int."""
        if torch.compiler.is_dynamo_compiling() or not all(isinstance(n, int) for n in (size, blocks, *plan)):
            return False
        b, h = self.block_size, self.halo_size
        pad_before, _, step, length = plan
        starts = [i * step - pad_before for i in range(blocks)]
        return all(0 <= start and start + length <= size and i * b - h <= start and start + length <= i * b + b + h
                   for i, start in enumerate(starts))

    def _unblock(self, out: torch.Tensor, geom: List[int], graph: bool = False) -> torch.Tensor:
        """(N, dv, bq^2) back to a (B, heads * dv, hq, wq) map, a fresh tensor outside traced / exported graphs."""
        nh, nw, hq, wq = geom
        out = blocks_to_map(out, self.block_size // self.stride, nh, nw, hq, wq, fresh=not graph)
        return out.reshape(out.shape[0] // self.heads, self.heads * self.dim_head_v, hq, wq)

    # ---- forward ------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        impl, gather_op, crop, graph = self._call_plan(x)
        if impl == 'fused':
            return self.proj(self._fused_forward(x))
        if graph and impl == 'broadcast':
            return self.proj(self._graph_forward(x, crop))
        q, k, v, rel, geom = self._blocked(x, crop, gather_op)
        return self.proj(self._unblock(self._attend(impl, q, k, v, rel), geom, graph))

    @torch.jit.unused
    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The C kernel reads its blocks and windows straight from the q and kv maps: no window copies, no permutes."""
        q, kv = self._project(x)
        _, plan_h, rows_h, mask_h = self._axis(x.shape[2], True, q.dtype, x.device)
        _, plan_w, rows_w, mask_w = self._axis(x.shape[3], True, q.dtype, x.device)
        out = attend_fused_maps(q, kv, self.rel_pos_h, self.rel_pos_w, rows_h[:, :, 0], rows_w[:, :, 0], mask_h, mask_w,
                                [self.heads, plan_h[2], plan_h[0], plan_w[2], plan_w[0]], self.scale)
        # The kernel saved its output for the backward: an in-place op after the layer must not change it.
        return out.clone() if out.requires_grad and isinstance(self.proj, nn.Identity) else out

    @torch.jit.unused
    def _kept_axis_terms(self, size: int, blocks: int, plan: Tuple[int, int, int, int], dtype: torch.dtype,
                         device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """``_axis_terms``, kept per input size in eager mode; traced, compiled and exported graphs build them."""
        # A dozen small ops (kernel launches on CUDA) per axis and call cost more than a batch-1 stage-4 attention.
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self._axis_terms(size, blocks, plan, dtype, device)
        cache = self.__dict__.setdefault('_axis_terms_cache', {})
        key = (size, blocks, plan, dtype, device)
        if key not in cache:
            with torch.inference_mode(False), torch.no_grad():  # usable by a later call that records gradients
                if len(cache) >= 32:  # many input sizes (multi-scale training): keep the memory bounded
                    cache.clear()
                cache[key] = self._axis_terms(size, blocks, plan, dtype, device)
        return cache[key]

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dense attention over all pixels with an explicit window mask (slow, for tests)."""
        # Keys outside a query's window contribute nothing, not even NaN/inf (as in the fast paths).
        self._check_input(x)
        B, _, H, W = x.shape
        b, h, s = self.block_size, self.halo_size, self.stride
        heads, d = self.heads, self.dim_head
        hq, wq = self.output_size(H, W)

        # per-head channel groups, every pixel a token
        q = rearrange(self.q(x)[:, :, ::s, ::s], 'b (n d) h w -> b n d (h w)', n=heads)
        kv = rearrange(self.kv(x), 'b (n c) h w -> b n c (h w)', n=heads)
        k, v = kv[:, :, :d], kv[:, :, d:]

        dev = x.device
        qy, qx = torch.meshgrid(torch.arange(hq, device=dev) * s, torch.arange(wq, device=dev) * s, indexing='ij')
        ky, kx = torch.meshgrid(torch.arange(H, device=dev), torch.arange(W, device=dev), indexing='ij')
        qy, qx, ky, kx = qy.reshape(-1, 1), qx.reshape(-1, 1), ky.reshape(1, -1), kx.reshape(1, -1)
        # A key is visible to a query iff it lies in the halo window of the query's block.
        top, left = (qy // b) * b - h, (qx // b) * b - h
        visible = (ky >= top) & (ky < top + b + 2 * h) & (kx >= left) & (kx < left + b + 2 * h)
        # Table row of each (query, key) offset; pairs outside the window are masked, clamp keeps them in range.
        center = b + h - 1
        pos_h = self.rel_pos_h[(ky - qy + center).clamp(0, 2 * center)]
        pos_w = self.rel_pos_w[(kx - qx + center).clamp(0, 2 * center)]

        content = torch.einsum('bndq,bndk->bnqk', q, k) * self.scale
        rel = torch.einsum('bndq,qkd->bnqk', q, pos_h) + torch.einsum('bndq,qkd->bnqk', q, pos_w)
        attn = (content + rel).masked_fill(~visible, float('-inf')).softmax(-1)
        # Zero attention times a NaN value is NaN: take the products of visible pairs only.
        weighted = torch.where(visible[:, :, None], attn[..., None] * v.transpose(-1, -2)[:, :, None], 0.)
        out = weighted.sum(3).transpose(-1, -2)
        return self.proj(rearrange(out, 'b n d (h w) -> b (n d) h w', h=hq))


def cut_windows(padded: torch.Tensor, heads: int, dim_head: int, plan_h: Tuple[int, int, int, int],
                plan_w: Tuple[int, int, int, int], gather_op: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of every window of the padded kv map (``windows.py``), by the custom op or in plain ops."""
    if gather_op:
        return _gather_windows(padded, heads, dim_head, plan_h, plan_w)
    return unfold_windows(padded, heads, dim_head, plan_h[2], plan_h[3], plan_w[2], plan_w[3])


@torch.jit.unused
def _gather_windows(padded: torch.Tensor, heads: int, dim_head: int, plan_h: Tuple[int, int, int, int],
                    plan_w: Tuple[int, int, int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    return gather_windows(padded, heads, dim_head, plan_h[2], plan_h[3], plan_w[2], plan_w[3])


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) as a contiguous (B, H, W, C) tensor."""
    # Contiguous, not a permuted view: exporters then never ask the view's memory format, a question that guards on
    # the batch size (an export from a batch of 1 would lose its dynamic batch). In ONNX it is one Transpose, which
    # ONNX Runtime folds into the convolution before it.
    return x.permute(0, 2, 3, 1).contiguous()


def _one_block(nh: int, nw: int) -> bool:
    """Whether a map is known (plain ints) to be one block; False for symbolic counts, which must not be asked."""
    return isinstance(nh, int) and isinstance(nw, int) and nh == 1 and nw == 1


def _concrete_if_small(blocks: int) -> int:
    """1 or 2 as a plain int, other counts unchanged."""
    # A constant keeps torch.compile's reshapes of one- and two-block maps static (their cropped window plans guard
    # on these values anyway).
    return 1 if blocks == 1 else 2 if blocks == 2 else blocks
