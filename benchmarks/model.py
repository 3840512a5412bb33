"""Whole-model speed: ours halonet_h1 vs timm's halonet_h1 vs resnet50, img/s, GMAC/s, ratios (docs/benchmarks.md)."""
from functools import partial
from typing import List

import timm
import torch

from benchmarks.plot import save_results, script_parser
from timm_halo import bench

OURS, TIMM, RESNET = 'ours halonet_h1', 'timm halonet_h1', 'resnet50'
# the three models every whole-model comparison times (benchmarks.deploy and benchmarks.gpu too)
MODELS = {OURS: partial(timm.create_model, 'halonet_h1'),
          TIMM: timm.models.byoanet.halonet_h1,  # timm's own; the registry name is ours once timm_halo is imported
          RESNET: partial(timm.create_model, 'resnet50')}


def _ours_with_kernel(kernel: str) -> torch.nn.Module:
    """Ours with one attention kernel forced; the meta-device copy that counts GMACs keeps 'auto'."""
    return timm.create_model('halonet_h1', attn_impl='auto' if torch.get_default_device().type == 'meta' else kernel)


def contenders(kernels: List[str]) -> List[bench.ModelSpec]:
    return [bench.ModelSpec(OURS, MODELS[OURS], 256),
            *[bench.ModelSpec(f'{OURS} {k}', partial(_ours_with_kernel, k), 256) for k in kernels],
            bench.ModelSpec(TIMM, MODELS[TIMM], 256), bench.ModelSpec(RESNET, MODELS[RESNET], 224),
            bench.ModelSpec(RESNET, MODELS[RESNET], 256)]


def ratios(results: List[bench.ModelResult]) -> List[dict]:
    """Ours vs each peer in the same mode: speed (ours img/s / peer img/s) and ours GMAC/s as % of the peer's."""
    ours = {r.mode: r for r in results if r.label == OURS}
    return [dict(mode=p.mode, peer=f'{p.label} @{p.img_size}', speed=ours[p.mode].img_per_s / p.img_per_s,
                 gmac_per_s_pct=100.0 * ours[p.mode].gmac_per_s / p.gmac_per_s)
            for p in results if p is not ours[p.mode]]


def main() -> None:
    parser = script_parser(__doc__, cpu_batch_size=2)
    parser.add_argument('--no-train', action='store_true', help='inference only: skip the train step')
    parser.add_argument('--kernels', nargs='+', default=[], metavar='IMPL',
                        help="also run ours with these attn_impl kernels forced (e.g. --kernels tiled)")
    args = parser.parse_args()
    bench.resolve_run(args, parser)
    results = bench.measure_modes(contenders(args.kernels), args, (False, True)[:2 - args.no_train])
    header = bench.run_header('Models', args)
    print(f'{header}\n{bench.format_table(results)}\n')
    print(f'{OURS} @256 vs each peer (speed: ours img/s / peer img/s; efficiency: ours GMAC/s as % of the peer\'s)')
    print(bench.table(['mode', 'peer', ('speed', 'speed', '{:.2f}x'),
                       ('GMAC/s % of peer', 'gmac_per_s_pct', '{:.0f}%')], ratio_rows := ratios(results)))
    save_results(args, 'model', header, rows=[vars(r) for r in results], ratios=ratio_rows)


if __name__ == '__main__':
    main()
