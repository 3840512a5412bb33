"""Cost vs input resolution: is ours halonet_h1 linear in the pixel count, within ±15%? (docs/benchmarks.md)."""
from functools import partial
from typing import List

import timm

from benchmarks.plot import save_results, script_parser, yes_no
from timm_halo import bench

TOLERANCE_PCT = 15.0


def rows_for(results: List[bench.ModelResult]) -> List[dict]:
    """Per-size rows of one mode, deviations normalised to the first size."""
    def per_mpix(r: bench.ModelResult) -> tuple:  # (seconds per image, GMACs) per megapixel
        return r.seconds / r.batch_size / (r.img_size ** 2 / 1e6), r.gmacs / (r.img_size ** 2 / 1e6)

    base_s, base_gmacs = per_mpix(results[0])
    rows = []
    for r in results:
        s, gmacs = per_mpix(r)
        time_dev = 100.0 * (s / base_s - 1.0)
        rows.append(dict(mode=r.mode, img_size=r.img_size, mpix=r.img_size ** 2 / 1e6, batch_size=r.batch_size,
                         ms_per_img=r.seconds / r.batch_size * 1e3, ms_per_mpix=s * 1e3, time_deviation_pct=time_dev,
                         gmacs=r.gmacs, gmacs_deviation_pct=100.0 * (gmacs / base_gmacs - 1.0),
                         within_target=abs(time_dev) <= TOLERANCE_PCT))
    return rows


COLUMNS = ['mode', ('input', 'img_size', '{}'), ('Mpix', 'mpix', '{:.3f}'), ('ms/img', 'ms_per_img', '{:.1f}'),
           ('ms/Mpix', 'ms_per_mpix', '{:.1f}'), ('time vs linear', 'time_deviation_pct', '{:+.1f}%'),
           ('GMACs/img', 'gmacs', '{:.2f}'), ('GMACs vs linear', 'gmacs_deviation_pct', '{:+.1f}%'),
           (f'within ±{TOLERANCE_PCT:g}%', 'within_target', yes_no)]


def main() -> None:
    parser = script_parser(__doc__, cpu_batch_size=1)  # 768 px costs 9x a 256 px image: minutes on 2 cores
    parser.add_argument('--model', default='halonet_h1', help='timm model name (default: halonet_h1, ours)')
    parser.add_argument('--sizes', type=int, nargs='+', default=[256, 384, 512, 768],
                        help='input sizes; deviations are relative to the first (default: 256 384 512 768)')
    parser.add_argument('--train', action='store_true', help='also time a train step (fwd+bwd)')
    args = parser.parse_args()
    bench.resolve_run(args, parser)
    if not timm.is_model(args.model):
        parser.error(f'unknown model {args.model!r}')
    specs = [bench.ModelSpec(args.model, partial(timm.create_model, args.model), size) for size in args.sizes]
    rows = [row for train in ((False, True) if args.train else (False,))
            for row in rows_for(bench.measure_modes(specs, args, (train,)))]
    header = bench.run_header(f'{args.model} cost vs resolution, deviation from linear in pixels normalised to '
                              f'{args.sizes[0]} px', args)
    print(f'{header}\n{bench.table(COLUMNS, rows)}')
    save_results(args, 'resolution', header, tolerance_pct=TOLERANCE_PCT, rows=rows)


if __name__ == '__main__':
    main()
