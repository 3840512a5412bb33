"""HaloAttention vs timm's HaloAttn (equal dims): forward, forward+backward and peak memory.

    python -m benchmarks.layer [--device cpu|cuda] [--repeats 7]

Shapes are HaloNet-H1's stage 1 and stage 3 (block 8, halo 3, 8 heads). Timings are medians of interleaved
runs in one process; peak memory is the extra memory of one fwd+bwd (CPU: peak RSS growth; CUDA: allocator peak).
"""
import argparse
import json
import platform
from functools import partial
from typing import Dict, List, Tuple

import torch
from timm.layers.halo_attn import HaloAttn

from benchmarks.harness import interleaved_medians, peak_memory, peak_memory_in_child
from timm_halo.layers import HaloAttention

SHAPES: Dict[str, Tuple[int, int, int]] = {  # name: (batch, channels, size)
    'stage1 B8 C64 64x64': (8, 64, 64),
    'stage3 B8 C256 16x16': (8, 256, 16),
}
BLOCK, HALO, HEADS = 8, 3, 8


def make_layer(impl: str, channels: int, device: torch.device) -> torch.nn.Module:
    if impl == 'timm_halo':
        return HaloAttention(channels, block_size=BLOCK, halo_size=HALO, heads=HEADS, dim_head=channels // HEADS)
    if impl == 'timm':
        return HaloAttn(channels, channels, num_heads=HEADS, block_size=BLOCK, halo_size=HALO)
    raise ValueError(impl)


def _fwd(layer, x):
    with torch.no_grad():
        layer(x)


def _fwd_bwd(layer, x):
    layer(x).sum().backward()


def measure_memory(impl: str, shape: str, device: torch.device) -> int:
    batch, channels, size = SHAPES[shape]
    layer = make_layer(impl, channels, device).to(device)
    x = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
    return peak_memory(lambda: _fwd_bwd(layer, x), device)


def run(device: torch.device, repeats: int) -> List[dict]:
    rows = []
    impls = ['timm', 'timm_halo']
    for shape, (batch, channels, size) in SHAPES.items():
        torch.manual_seed(0)
        layers = {impl: make_layer(impl, channels, device).to(device) for impl in impls}
        x = torch.randn(batch, channels, size, size, device=device, requires_grad=True)

        fwd_t = interleaved_medians({i: partial(_fwd, m, x) for i, m in layers.items()}, device, repeats)
        bwd_t = interleaved_medians({i: partial(_fwd_bwd, m, x) for i, m in layers.items()}, device, repeats)
        if device.type == 'cuda':
            mem = {i: measure_memory(i, shape, device) for i in impls}
        else:
            mem = {i: peak_memory_in_child('benchmarks.layer', ['--impl', i, '--shape', shape]) for i in impls}
        for impl in impls:
            rows.append(dict(shape=shape, impl=impl, fwd_ms=fwd_t[impl] * 1e3, fwd_bwd_ms=bwd_t[impl] * 1e3,
                             peak_mb=mem[impl] / 2**20))
    return rows


def print_table(rows: List[dict], device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()
    print(f'HaloAttention vs timm HaloAttn | device {device.type} ({name}) | torch {torch.__version__} | '
          f'{torch.get_num_threads()} threads | medians of interleaved runs')
    print('| shape | impl | fwd ms | fwd+bwd ms | peak MB (fwd+bwd) | fwd speedup | fwd+bwd speedup | memory ratio |')
    print('|---|---|---|---|---|---|---|---|')
    for row in rows:
        base = next(r for r in rows if r['shape'] == row['shape'] and r['impl'] == 'timm')
        print(f"| {row['shape']} | {row['impl']} | {row['fwd_ms']:.1f} | {row['fwd_bwd_ms']:.1f} "
              f"| {row['peak_mb']:.0f} "
              f"| {base['fwd_ms'] / row['fwd_ms']:.2f}x | {base['fwd_bwd_ms'] / row['fwd_bwd_ms']:.2f}x "
              f"| {row['peak_mb'] / max(base['peak_mb'], 1e-9):.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--measure-memory', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--impl', help=argparse.SUPPRESS)
    parser.add_argument('--shape', help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.measure_memory:
        print(json.dumps(dict(peak_bytes=measure_memory(args.impl, args.shape, device))))
        return
    print_table(run(device, args.repeats), device)


if __name__ == '__main__':
    main()
