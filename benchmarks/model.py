"""Whole-model speed: ours halonet_h1 vs timm's own halonet_h1 vs resnet50 (224 and 256 px), inference and train
step; img/s, GMACs, GMAC/s and ratios (docs/benchmarks.md).

    python -m benchmarks.model [--device cpu|cuda] [--batch-size N] [--amp [bf16|fp16]] [--compile] [--kernels IMPL ...]
"""
import argparse
from functools import partial
from typing import List

import timm
import torch

from benchmarks.plot import save_results, table
from timm_halo import HaloAttention, bench

OURS = 'ours halonet_h1'


def _ours_with_kernel(kernel: str) -> torch.nn.Module:
    """Ours with one attention kernel forced; the meta-device copy that counts GMACs keeps 'auto'."""
    model = timm.create_model('halonet_h1')
    if next(model.parameters()).device.type != 'meta':
        for module in model.modules():
            if isinstance(module, HaloAttention):
                module.attn_impl = kernel
    return model


def contenders(kernels: List[str]) -> List[bench.ModelSpec]:
    return [
        bench.ModelSpec(OURS, partial(timm.create_model, 'halonet_h1'), 256),
        *[bench.ModelSpec(f'{OURS} {k}', partial(_ours_with_kernel, k), 256) for k in kernels],
        bench.ModelSpec('timm halonet_h1', timm.models.byoanet.halonet_h1, 256),
        bench.ModelSpec('resnet50', partial(timm.create_model, 'resnet50'), 224),
        bench.ModelSpec('resnet50', partial(timm.create_model, 'resnet50'), 256),
    ]


def ratios(results: List[bench.ModelResult]) -> List[dict]:
    """Ours vs each peer in the same mode: speed (ours img/s / peer img/s) and ours GMAC/s as % of the peer's."""
    out = []
    for mode in dict.fromkeys(r.mode for r in results):
        ours = next(r for r in results if r.mode == mode and r.label == OURS)
        for peer in (r for r in results if r.mode == mode and r is not ours):
            out.append(dict(mode=mode, peer=f'{peer.label} @{peer.img_size}', speed=ours.img_per_s / peer.img_per_s,
                            gmac_per_s_pct=100.0 * ours.gmac_per_s / peer.gmac_per_s))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_run_args(parser, cpu_batch_size=2)
    parser.add_argument('--no-train', action='store_true', help='inference only: skip the train step')
    parser.add_argument('--plot', metavar='PATH', help='also draw the results as a PNG (needs matplotlib)')
    parser.add_argument('--kernels', nargs='+', default=[], metavar='IMPL',
                        help="also run ours with these attn_impl kernels forced (e.g. --kernels tiled)")
    args = parser.parse_args()
    device, amp_dtype, batch_size, repeats = bench.resolve_run(args, parser)
    results: List[bench.ModelResult] = []
    for train in (False,) if args.no_train else (False, True):
        with bench.busy_load(args.load):
            results += bench.measure_models(contenders(args.kernels), device, batch_size, train=train,
                                            repeats=repeats, warmup=args.warmup, amp_dtype=amp_dtype,
                                            compiled=args.compile, channels_last=args.channels_last)
    header = bench.run_header(device, f'Models, batch {batch_size}, {repeats} repeats', args)
    ratio_rows = ratios(results)
    print(f'{header}\n{bench.format_table(results)}\n')
    print(f'{OURS} @256 vs each peer (speed: ours img/s / peer img/s; efficiency: ours GMAC/s as % of the peer\'s)')
    print(table(['mode', 'peer', ('speed', 'speed', '{:.2f}x'), ('GMAC/s % of peer', 'gmac_per_s_pct', '{:.0f}%')],
                ratio_rows))
    data = dict(benchmark='model', header=header, args=vars(args), rows=[r.as_dict() for r in results],
                ratios=ratio_rows)
    save_results(data, args.json, args.plot)


if __name__ == '__main__':
    main()
