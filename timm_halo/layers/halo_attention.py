"""Blocked local self-attention with a halo (HaloNet).

Paper: `Scaling Local Self-Attention for Parameter Efficient Visual Backbones`
    - https://arxiv.org/abs/2103.12731 (Vaswani et al., CVPR 2021)

Queries are grouped in non-overlapping ``block_size`` x ``block_size`` blocks. Every query of a block
attends to the ``(block_size + 2 * halo_size)`` square window centred on its block. Logits are

    scale * q . k  +  q . rel_pos_h[dy]  +  q . rel_pos_w[dx]

where ``(dy, dx)`` is the key's position minus the query's position, in input pixels. Window positions
that fall outside the image (the border halo, and the padding added when H or W is not a multiple of
the block size) are masked: they get exactly zero attention probability.

With ``stride=2`` the queries of each block are subsampled (every other row and column), keys and values
come from the full-resolution window, and the output has ``ceil(H / 2) x ceil(W / 2)`` pixels.

Three implementations share the parameters:

* ``forward`` on CPU in eager mode runs a tiled, flash-attention style kernel (``_HaloAttentionTiled``):
  the (blocks, b^2, w^2) logits are built tile by tile so they stay in cache, and the backward pass
  recomputes them instead of storing them.
* Under TorchScript, ``torch.compile``, export/tracing and on accelerators it runs the same maths on
  whole tensors (``attend_broadcast``): one logits tensor, the relative terms added by broadcasting.
* ``reference_forward`` is dense attention over every pixel with an explicit window mask and explicit
  relative offsets. It is slow and obviously correct; the tests hold the fast paths to it.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import register_notrace_function, register_notrace_module, trunc_normal_
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ['HaloAttention', 'attend_broadcast', 'check_image_input']

# Target number of logits per tile in the tiled CPU kernel (about 4 MB in fp32): small enough to stay in
# a core's cache, large enough that Python overhead per tile is negligible. Tuned on a 2-core x86 VM.
_TILE_LOGITS = 1 << 20


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device_type argument
        return torch.is_autocast_cpu_enabled() if device_type == 'cpu' else torch.is_autocast_enabled()
    except RuntimeError:  # a device autocast does not know (e.g. meta): no autocast there
        return False


@torch.jit.unused
def _check_dtype(x: torch.Tensor, param_dtype: torch.dtype, owner: str) -> None:
    # PyTorch reports this deep inside a convolution ("expected scalar type Double but found Float"); name the
    # module and both dtypes instead. Under autocast a mismatch is the normal case (bf16 activations meet fp32
    # parameters), so only complain outside it.
    if x.dtype != param_dtype and not _autocast_enabled(x.device.type):
        raise TypeError(
            f'{owner} got a {x.dtype} input but its parameters are {param_dtype}: convert the input '
            f'(x.to({param_dtype})) or the module (.to({x.dtype})), or run under torch.autocast')


@register_notrace_function  # a leaf for torch.fx: the checks need real shapes, not proxies
def check_image_input(x: torch.Tensor, channels: int, param_dtype: torch.dtype, owner: str) -> None:
    """Raise a clear error unless ``x`` is a 4-D NCHW floating point tensor with ``channels`` channels whose
    dtype matches the parameters' (``param_dtype``; any dtype under autocast)."""
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


def attend_broadcast(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rel_h: torch.Tensor,
        rel_w: torch.Tensor,
) -> torch.Tensor:
    """Windowed attention on whole tensors.

    Args:
        q: (N, bq * bq, d) queries, already scaled.
        k: (N, w * w, d) keys of each query block's window.
        v: (N, w * w, dv) values of each window.
        rel_h: (N, bq, bq, w) height logits (relative term plus border mask) per query row and key row.
        rel_w: (N, bq, bq, w) width logits per query and key column.

    Returns:
        (N, bq * bq, dv)
    """
    n, bq, _, win = rel_h.shape
    logits = q @ k.transpose(-1, -2)
    # The relative terms are separable per axis: add them by broadcasting instead of materialising them.
    logits = logits.view(n, bq, bq, win, win) + rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)
    attn = logits.view(n, bq * bq, win * win).softmax(dim=-1)
    return attn @ v


def _tile_logits(
        q: torch.Tensor, k: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
) -> torch.Tensor:
    """Attention probabilities of one tile; the softmax runs in at least fp32."""
    n, bq, _, win = rel_h.shape
    logits = torch.matmul(q, k.transpose(-1, -2))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logits5 = logits.view(n, bq, bq, win, win)
    logits5.add_(rel_h.unsqueeze(-1))
    logits5.add_(rel_w.unsqueeze(-2))
    return torch.softmax(logits, dim=-1)


class _HaloAttentionTiled(torch.autograd.Function):
    """Same maths as ``attend_broadcast``, tiled over windows; backward recomputes each tile's logits."""

    @staticmethod
    def forward(ctx, q, k, v, rel_h, rel_w, tile):
        n = q.shape[0]
        out = q.new_empty(n, q.shape[1], v.shape[-1])
        for i in range(0, n, tile):
            s = slice(i, i + tile)
            attn = _tile_logits(q[s], k[s], rel_h[s], rel_w[s]).to(v.dtype)
            torch.matmul(attn, v[s], out=out[s])
        ctx.save_for_backward(q, k, v, rel_h, rel_w, out)
        ctx.tile = tile
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, rel_h, rel_w, out = ctx.saved_tensors
        tile = ctx.tile
        n, bq, _, win = rel_h.shape
        grad_out = grad_out.contiguous()
        # Softmax backward needs rowsum(dA * A) == rowsum(dO * O) per query (flash-attention identity).
        acc_dtype = torch.promote_types(out.dtype, torch.float32)
        delta = (grad_out.to(acc_dtype) * out.to(acc_dtype)).sum(-1, keepdim=True)
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        grad_rel_h, grad_rel_w = torch.empty_like(rel_h), torch.empty_like(rel_w)
        for i in range(0, n, tile):
            s = slice(i, i + tile)
            attn = _tile_logits(q[s], k[s], rel_h[s], rel_w[s])
            torch.matmul(attn.to(v.dtype).transpose(-1, -2), grad_out[s], out=grad_v[s])
            grad_attn = torch.matmul(grad_out[s], v[s].transpose(-1, -2)).to(acc_dtype)
            grad_logits = grad_attn.sub_(delta[s]).mul_(attn)
            grad_logits5 = grad_logits.view(-1, bq, bq, win, win)
            torch.sum(grad_logits5, -1, out=grad_rel_h[s])
            torch.sum(grad_logits5, -2, out=grad_rel_w[s])
            grad_logits = grad_logits.to(q.dtype)
            torch.matmul(grad_logits, k[s], out=grad_q[s])
            torch.matmul(grad_logits.transpose(-1, -2), q[s], out=grad_k[s])
        return grad_q, grad_k, grad_v, grad_rel_h, grad_rel_w, None


@register_notrace_module  # a leaf for torch.fx feature extraction: its shape arithmetic is not symbolic
class HaloAttention(nn.Module):
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
    """

    def __init__(
            self,
            dim: int,
            block_size: int = 8,
            halo_size: int = 3,
            dim_head: int = 64,
            heads: int = 8,
            dim_out: Optional[int] = None,
            stride: int = 1,
            value_ratio: float = 1.0,
            qkv_bias: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        for name, value, lowest in (
                ('dim', dim, 1), ('block_size', block_size, 1), ('halo_size', halo_size, 0),
                ('dim_head', dim_head, 1), ('heads', heads, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f'HaloAttention: {name} must be an integer >= {lowest}, got {value!r}')
        if stride not in (1, 2):
            raise ValueError(f'HaloAttention: stride must be 1 or 2, got {stride!r}')
        if block_size % stride:
            raise ValueError(
                f'HaloAttention: block_size ({block_size}) must be divisible by stride ({stride}) '
                'so that every block keeps the same number of queries')
        dim_head_v = int(round(dim_head * value_ratio))
        if dim_head_v < 1:
            raise ValueError(f'HaloAttention: value_ratio {value_ratio!r} leaves no value channels')
        dim_out = dim if dim_out is None else dim_out

        self.dim = dim
        self.dim_out = dim_out
        self.heads = heads
        self.dim_head = dim_head
        self.dim_head_v = dim_head_v
        self.block_size = block_size
        self.halo_size = halo_size
        self.win_size = block_size + 2 * halo_size
        self.stride = stride
        self.scale = dim_head ** -0.5

        self.q = nn.Conv2d(dim, heads * dim_head, 1, bias=qkv_bias, **dd)
        self.kv = nn.Conv2d(dim, heads * (dim_head + dim_head_v), 1, bias=qkv_bias, **dd)
        # One entry per possible offset between a query and a key of its window, centred on offset 0.
        num_rel = 2 * (block_size + halo_size) - 1
        self.rel_pos_h = nn.Parameter(torch.empty(num_rel, dim_head, **dd))
        self.rel_pos_w = nn.Parameter(torch.empty(num_rel, dim_head, **dd))
        inner_v = heads * dim_head_v
        self.proj = nn.Conv2d(inner_v, dim_out, 1, **dd) if inner_v != dim_out else nn.Identity()

        # Gather index for the relative tables: [query row in block, key row in window] -> table row.
        self.register_buffer(
            'rel_index', torch.empty(block_size // stride, self.win_size, dtype=torch.long, device=device),
            persistent=False)
        self.init_non_persistent_buffers()
        self.reset_parameters()

    def init_non_persistent_buffers(self) -> None:
        """Fill ``rel_index`` (also after ``to_empty()`` from the meta device; timm calls this)."""
        device = self.rel_index.device
        queries = torch.arange(0, self.block_size, self.stride, device=device)
        window = torch.arange(self.win_size, device=device)
        offsets = (window[None, :] - self.halo_size) - queries[:, None]
        self.rel_index.copy_(offsets + self.block_size + self.halo_size - 1)

    def reset_parameters(self) -> None:
        trunc_normal_(self.q.weight, std=self.dim ** -0.5)
        trunc_normal_(self.kv.weight, std=self.dim ** -0.5)
        trunc_normal_(self.rel_pos_h, std=self.scale)
        trunc_normal_(self.rel_pos_w, std=self.scale)

    def extra_repr(self) -> str:
        return (
            f'dim={self.dim}, dim_out={self.dim_out}, heads={self.heads}, dim_head={self.dim_head}, '
            f'dim_head_v={self.dim_head_v}, block_size={self.block_size}, halo_size={self.halo_size}, '
            f'stride={self.stride}')

    def _check_input(self, x: torch.Tensor) -> None:
        check_image_input(x, self.dim, self.q.weight.dtype, 'HaloAttention')

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """Spatial size of the output for an input of ``height x width``."""
        # (n + s - 1) // s rather than -(-n // s): the ONNX exporter turns // into Div, which truncates
        # toward zero, so floor division of a negative size would be wrong for dynamic input sizes.
        return (height + self.stride - 1) // self.stride, (width + self.stride - 1) // self.stride

    def _border_mask(self, num_blocks: int, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(num_blocks, win) additive mask: 0 where the window row/column lies inside the image."""
        starts = torch.arange(num_blocks, device=device) * self.block_size - self.halo_size
        pos = starts[:, None] + torch.arange(self.win_size, device=device)[None, :]
        inside = (pos >= 0) & (pos < size)
        # A row mask and a column mask can both hit one logit: a quarter of the dtype's lowest finite value
        # keeps their sum (plus any real logit) finite in fp16/bf16/fp32. nan_to_num gives that value in a
        # TorchScript-friendly way (torch.finfo is not scriptable).
        masked = torch.full((), float('-inf'), dtype=dtype, device=device).nan_to_num() / 4
        return torch.where(inside, torch.zeros_like(masked), masked)

    def _blocked(
            self, x: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, List[int]]:
        """Project and cut into blocks: q (N, bq^2, d), k/v (N, w^2, d/dv), rel_h/rel_w (N, bq, bq, w)."""
        B, _, H, W = x.shape
        b, h, s, win = self.block_size, self.halo_size, self.stride, self.win_size
        bq = b // s
        nh, nw = (H + b - 1) // b, (W + b - 1) // b  # ceil division without negatives (see output_size)
        hq, wq = self.output_size(H, W)
        heads, d, dv = self.heads, self.dim_head, self.dim_head_v

        xq = x[:, :, ::s, ::s] if s > 1 else x
        q = self.q(xq)
        q = F.pad(q, [0, nw * bq - wq, 0, nh * bq - hq])
        q = q.reshape(B, heads, d, nh, bq, nw, bq).permute(0, 1, 3, 5, 4, 6, 2)
        q = q.reshape(B, heads, nh, nw, bq, bq, d)

        # Relative logits per axis: q . table[offset], gathered per (query row, key row) pair.
        rel_h = torch.einsum('bnhwyxd,ykd->bnhwyxk', q, self.rel_pos_h[self.rel_index])
        rel_w = torch.einsum('bnhwyxd,xkd->bnhwyxk', q, self.rel_pos_w[self.rel_index])
        # Border halo and padding: the mask is separable too, so it rides on the per-axis terms.
        mask_h = self._border_mask(nh, H, rel_h.dtype, x.device)
        mask_w = self._border_mask(nw, W, rel_w.dtype, x.device)
        rel_h = rel_h + mask_h[:, None, None, None, :]
        rel_w = rel_w + mask_w[None, :, None, None, :]

        kv = self.kv(x)
        kv = F.pad(kv, [h, nw * b - W + h, h, nh * b - H + h])
        kv = kv.unfold(2, win, b).unfold(3, win, b)  # B, C, nh, nw, win, win (a view)
        kv = kv.reshape(B, heads, d + dv, nh, nw, win * win).permute(0, 1, 3, 4, 5, 2)
        kv = kv.reshape(-1, win * win, d + dv)
        k, v = kv.split([d, dv], dim=-1)

        n = B * heads * nh * nw
        q = q.reshape(n, bq * bq, d) * self.scale
        return q, k, v, rel_h.reshape(n, bq, bq, win), rel_w.reshape(n, bq, bq, win), [B, nh, nw, hq, wq]

    @torch.jit.unused
    def _attend_tiled(self, q, k, v, rel_h, rel_w) -> torch.Tensor:
        per_window = rel_h.shape[1] ** 2 * rel_h.shape[3] ** 2
        tile = max(1, _TILE_LOGITS // per_window)
        return _HaloAttentionTiled.apply(q, k, v, rel_h, rel_w, tile)

    def _use_tiled(self, x: torch.Tensor) -> bool:
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return False
        if torch.compiler.is_compiling():
            return False  # inductor fuses the broadcast form itself
        return x.device.type == 'cpu'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        q, k, v, rel_h, rel_w, geom = self._blocked(x)
        if self._use_tiled(x):
            out = self._attend_tiled(q, k, v, rel_h, rel_w)
        else:
            out = attend_broadcast(q, k, v, rel_h, rel_w)
        return self.proj(self._unblock(out, geom))

    def _unblock(self, out: torch.Tensor, geom: List[int]) -> torch.Tensor:
        B, nh, nw, hq, wq = geom
        bq = self.block_size // self.stride
        out = out.reshape(B, self.heads, nh, nw, bq, bq, self.dim_head_v).permute(0, 1, 6, 2, 4, 3, 5)
        out = out.reshape(B, self.heads * self.dim_head_v, nh * bq, nw * bq)
        return out[:, :, :hq, :wq]

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dense attention over all pixels with an explicit window mask: slow, for tests only."""
        self._check_input(x)
        B, _, H, W = x.shape
        b, h, s = self.block_size, self.halo_size, self.stride
        heads, d = self.heads, self.dim_head
        hq, wq = self.output_size(H, W)

        # per-head channel groups, every pixel a token
        q = rearrange(self.q(x)[:, :, ::s, ::s], 'b (n d) h w -> b n d (h w)', n=heads)
        kv = rearrange(self.kv(x), 'b (n c) h w -> b n c (h w)', n=heads)
        k, v = kv[:, :, :d], kv[:, :, d:]

        qy, qx = torch.meshgrid(torch.arange(hq) * s, torch.arange(wq) * s, indexing='ij')
        ky, kx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing='ij')
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
        logits = (content + rel).masked_fill(~visible, float('-inf'))
        out = torch.einsum('bnqk,bndk->bndq', logits.softmax(-1), v)
        return self.proj(rearrange(out, 'b n d (h w) -> b (n d) h w', h=hq))
