"""HaloAttention vs timm's HaloAttn and lucidrains' halonet-pytorch: fwd, fwd+bwd, peak memory (docs/benchmarks.md)."""
import importlib.metadata
import importlib.util
import itertools
import multiprocessing
import os
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
from timm.layers.halo_attn import HaloAttn

from benchmarks.plot import save_results, script_parser
from timm_halo.bench import busy_load, device_name, interleaved_medians, peak_memory, table
from timm_halo.layers import HaloAttention
from timm_halo.layers import sdpa as sdpa_module

# (channels, map size) of each stage, as HaloNet-H1 at 256 px (benchmarks.gpu's too, at its own batch)
STAGES = {'stage1': (64, 64), 'stage2': (128, 32), 'stage3': (256, 16), 'stage4': (512, 8)}
SHAPES: Dict[str, Tuple[int, int, int]] = {f'{k} B8 C{c} {s}x{s}': (8, c, s) for k, (c, s) in STAGES.items()}
BLOCK, HALO, HEADS = 8, 3, 8
# 'timm_halo' is attn_impl='auto'; the others force one kernel of the implementation table.
KERNELS = ('timm_halo fused', 'timm_halo tiled', 'timm_halo sdpa', 'timm_halo broadcast')
OURS = ('timm_halo', *KERNELS, 'timm_halo compiled')
PEERS = ('timm', 'lucidrains')
LUCIDRAINS = importlib.util.find_spec('halonet_pytorch') is not None


def make_layer(impl: str, channels: int, device: torch.device) -> torch.nn.Module:
    """The layer ``impl`` with ``channels`` in and out, 8 heads of C/8, on ``device``."""
    if impl in OURS:
        layer = HaloAttention(channels, block_size=BLOCK, halo_size=HALO, heads=HEADS, dim_head=channels // HEADS,
                              attn_impl=impl.split()[1] if impl in KERNELS else 'auto').to(device)
        # dynamic=False: each shape gets its own layer, so no shape ever needs a dynamic graph.
        return torch.compile(layer, dynamic=False) if impl == 'timm_halo compiled' else layer
    if impl == 'timm':
        return HaloAttn(channels, channels, num_heads=HEADS, block_size=BLOCK, halo_size=HALO).to(device)
    if impl == 'lucidrains':
        from halonet_pytorch import HaloAttention as LucidrainsHaloAttention

        return LucidrainsHaloAttention(dim=channels, block_size=BLOCK, halo_size=HALO, dim_head=channels // HEADS,
                                       heads=HEADS).to(device)
    raise ValueError(impl)


def call(layer: torch.nn.Module, x: torch.Tensor, backward: bool, amp: Optional[torch.dtype] = None,
         pad: Optional[bool] = None) -> None:
    """One fwd (or fwd+bwd); ``amp``: under autocast; ``pad``: sets sdpa's CUDA_PAD_VALUES_FOR_FLASH first."""
    if pad is not None:  # at every call: benchmarks.gpu's contenders alternate
        sdpa_module.CUDA_PAD_VALUES_FOR_FLASH = pad
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None), torch.set_grad_enabled(backward):
        out = layer(x)
    if backward:
        out.float().sum().backward()


def measure_memory(impl: str, shape: str, device: torch.device) -> int:
    batch, channels, size = SHAPES[shape]
    layer = make_layer(impl, channels, device)
    x = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
    # One untimed call first: library start-up (oneDNN primitives, MKL buffers, the compiler's own memory) is
    # not the layer's, and every later training step runs warm.
    call(layer, x, True)
    layer.zero_grad(set_to_none=True)
    x.grad = None
    return peak_memory(partial(call, layer, x, True), device)


def run(device: torch.device, repeats: int, impls: List[str], load: int = 0) -> List[dict]:
    rows = []
    for shape, (batch, channels, size) in SHAPES.items():
        torch.manual_seed(0)
        layers = {impl: make_layer(impl, channels, device) for impl in impls}
        x = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
        with busy_load(load):
            fwd_t, bwd_t = (interleaved_medians({i: partial(call, m, x, backward) for i, m in layers.items()},
                                                repeats) for backward in (False, True))
        del layers
        # each in a fresh process (a pool of one, one task a process): on CPU the peak RSS growth, on CUDA the
        # allocator's peak. A fixed mmap threshold: glibc raises it after large frees and keeps later tensors on its
        # heap (RSS reads low); the child reads it at its start.
        os.environ.setdefault('MALLOC_MMAP_THRESHOLD_', '65536')
        with multiprocessing.get_context('spawn').Pool(1, maxtasksperchild=1) as pool:
            mem = {i: pool.apply(measure_memory, (i, shape, device)) for i in impls}
        rows += [dict(shape=shape, impl=i, load=load, fwd_ms=fwd_t[i] * 1e3, fwd_bwd_ms=bwd_t[i] * 1e3,
                      peak_mb=mem[i] / 2**20) for i in impls]
    return rows


def _vs(row: dict, peer: dict) -> dict:
    """Speedups (peer time / row time) and memory ratio (row / peer)."""
    return dict(fwd_speedup=peer['fwd_ms'] / row['fwd_ms'], fwd_bwd_speedup=peer['fwd_bwd_ms'] / row['fwd_bwd_ms'],
                memory_ratio=row['peak_mb'] / max(peer['peak_mb'], 1e-9))


def ratios(rows: List[dict]) -> List[dict]:
    """Each of our variants vs each peer (and compiled vs eager) of the same shape, from the same run."""
    by_key = {(r['shape'], r['impl']): r for r in rows}
    return [dict(shape=shape, ours=ours, peer=peer, **_vs(by_key[shape, ours], by_key[shape, peer]))
            for shape, ours, peer in itertools.product(SHAPES, OURS, PEERS + ('timm_halo',))
            if ours != peer and (shape, ours) in by_key and (shape, peer) in by_key]


RATIO_COLUMNS = [('fwd speedup', 'fwd_speedup', '{:.2f}x'), ('fwd+bwd speedup', 'fwd_bwd_speedup', '{:.2f}x'),
                 ('memory ratio', 'memory_ratio', '{:.2f}x')]
COLUMNS = ['shape', 'impl', ('fwd ms', 'fwd_ms', '{:.1f}'), ('fwd+bwd ms', 'fwd_bwd_ms', '{:.1f}'),
           ('peak MB (fwd+bwd)', 'peak_mb', '{:.0f}'), *RATIO_COLUMNS]


def main() -> None:
    parser = script_parser(__doc__)
    add = parser.add_argument
    add('--compile', action='store_true', help='add torch.compile(HaloAttention) (slow to compile)')
    add('--kernels', action='store_true', help='add each kernel of the table as a contender')
    add('--shapes', nargs='+', choices=list(SHAPES), default=None, help='default: all four stages')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in set(SHAPES) - set(args.shapes or SHAPES):
        del SHAPES[name]
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if not LUCIDRAINS:
        print('note: halonet-pytorch is not installed (pip install halonet-pytorch); skipping the lucidrains peer')
    impls = ['timm', *(['lucidrains'] if LUCIDRAINS else []), 'timm_halo', *(KERNELS if args.kernels else ()),
             *(['timm_halo compiled'] if args.compile else [])]
    rows = run(device, args.repeats or (20 if device.type == 'cuda' else 5), impls, args.load)
    peer = f'halonet-pytorch {importlib.metadata.version("halonet-pytorch")}' if LUCIDRAINS else 'none'
    header = (f'HaloAttention vs timm HaloAttn and lucidrains ({peer}) | device {device_name(device)} | '
              f'torch {torch.__version__} | medians of interleaved runs | '
              + (f'{args.load} busy-loop process(es) running' if args.load else 'quiet (no other load)'))
    timm_rows = {r['shape']: r for r in rows if r['impl'] == 'timm'}
    # the ratio columns are vs timm, as in earlier RESULTS.md tables
    print(f'{header}\n{table(COLUMNS, [dict(r, **_vs(r, timm_rows[r["shape"]])) for r in rows])}')
    print('\nOurs vs each peer (speedup: peer time / ours; memory ratio: ours / peer)')
    print(table(['shape', 'ours', 'peer', *RATIO_COLUMNS], ratios(rows)))
    save_results(args, 'layer', header, rows=rows, ratios=ratios(rows))


if __name__ == '__main__':
    main()
