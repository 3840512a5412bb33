"""Cost vs input resolution of ours halonet_h1: is it linear in the pixel count (within +-15%)? Time and GMACs per
pixel against the first size's (docs/benchmarks.md).

    python -m benchmarks.resolution [--sizes 256 384 512 768] [--train] [--batch-size N] [--json PATH] [--plot PATH]
"""
import argparse
from functools import partial
from typing import List

import timm

from benchmarks.plot import save_results, table, yes_no
from timm_halo import bench

TOLERANCE_PCT = 15.0


def rows_for(results: List[bench.ModelResult]) -> List[dict]:
    """Per-size rows of one mode, deviations normalised to the first size."""
    base = results[0]
    base_s_per_px = base.seconds / base.batch_size / base.img_size ** 2
    base_gmacs_per_px = base.gmacs / base.img_size ** 2
    rows = []
    for r in results:
        pixels = r.img_size ** 2
        s_per_img = r.seconds / r.batch_size
        time_dev = 100.0 * (s_per_img / pixels / base_s_per_px - 1.0)
        rows.append(dict(mode=r.mode, img_size=r.img_size, mpix=pixels / 1e6, batch_size=r.batch_size,
                         ms_per_img=s_per_img * 1e3, ms_per_mpix=s_per_img * 1e3 / (pixels / 1e6),
                         time_deviation_pct=time_dev, gmacs=r.gmacs,
                         gmacs_deviation_pct=100.0 * (r.gmacs / pixels / base_gmacs_per_px - 1.0),
                         within_target=abs(time_dev) <= TOLERANCE_PCT))
    return rows


COLUMNS = ['mode', ('input', 'img_size', '{}'), ('Mpix', 'mpix', '{:.3f}'), ('ms/img', 'ms_per_img', '{:.1f}'),
           ('ms/Mpix', 'ms_per_mpix', '{:.1f}'), ('time vs linear', 'time_deviation_pct', '{:+.1f}%'),
           ('GMACs/img', 'gmacs', '{:.2f}'), ('GMACs vs linear', 'gmacs_deviation_pct', '{:+.1f}%'),
           (f'within ±{TOLERANCE_PCT:g}%', 'within_target', yes_no)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='halonet_h1', help='timm model name (default: halonet_h1, ours)')
    parser.add_argument('--sizes', type=int, nargs='+', default=[256, 384, 512, 768],
                        help='input sizes; deviations are relative to the first (default: 256 384 512 768)')
    parser.add_argument('--train', action='store_true', help='also time a train step (fwd+bwd)')
    bench.add_run_args(parser, cpu_batch_size=1)  # 768 px costs 9x a 256 px image: a run within minutes on 2 cores
    parser.add_argument('--plot', metavar='PATH', help='also draw the results as a PNG (needs matplotlib)')
    args = parser.parse_args()
    device, amp_dtype, batch_size, repeats = bench.resolve_run(args, parser)
    if not timm.is_model(args.model):
        parser.error(f'unknown model {args.model!r}')
    specs = [bench.ModelSpec(args.model, partial(timm.create_model, args.model), size) for size in args.sizes]
    rows: List[dict] = []
    for train in (False, True) if args.train else (False,):
        with bench.busy_load(args.load):
            rows += rows_for(bench.measure_models(specs, device, batch_size, train=train, repeats=repeats,
                                                  warmup=args.warmup, amp_dtype=amp_dtype, compiled=args.compile,
                                                  channels_last=args.channels_last))
    header = bench.run_header(device, f'{args.model} cost vs resolution, batch {batch_size}, {repeats} repeats, '
                              f'deviation from linear in pixels normalised to {args.sizes[0]} px', args)
    print(header)
    print(table(COLUMNS, rows))
    data = dict(benchmark='resolution', header=header, args=vars(args), tolerance_pct=TOLERANCE_PCT, rows=rows)
    save_results(data, args.json, args.plot)


if __name__ == '__main__':
    main()
