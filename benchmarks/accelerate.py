"""timm's pretrained halo models, stock vs ``timm_halo.accelerate`` and a no-attention bound (docs/benchmarks.md)."""
import os
from functools import partial
from typing import List, Tuple

import timm
import torch
from timm.layers.halo_attn import HaloAttn

from benchmarks.plot import save_results, script_parser
from timm_halo import accelerate, bench
from timm_halo.layers import ATTN_IMPLS

MODELS = ['halonet26t', 'sehalonet33ts', 'halonet50ts', 'eca_halonext26ts', 'haloregnetz_b',
          'lamhalobotnet50ts_256', 'halo2botnet50ts_256']
STOCK, FAST, BOUND = 'stock', 'accelerated', 'no-attention bound'
GOALS = {'infer': 2.0, 'train': 1.5}  # speedup of halonet26t and halonet50ts at 256 px, CPU
GOAL_MODELS = ('halonet26t', 'halonet50ts')


class _FreeAttention(HaloAttn):
    """``HaloAttn`` with its q/kv projections and output shape, and no attention (for the bound only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x)
        v = self.kv(x)[:, -self.dim_out_v:, ::self.block_stride, ::self.block_stride]
        return self.pool(v + q[:, :1])


def _bound(name: str) -> torch.nn.Module:
    model = timm.create_model(name)
    for m in [m for m in model.modules() if type(m) is HaloAttn]:
        m.__class__ = _FreeAttention
    return model


def _accelerated(name: str, impl: str) -> torch.nn.Module:
    # The GMACs are counted on the meta device, where only the plain kernels run (same MACs).
    return accelerate(timm.create_model(name), attn_impl='auto' if torch.get_default_device().type == 'meta' else impl)


def contenders(names: List[str], impls: List[str], bound: bool) -> List[bench.ModelSpec]:
    makers = {STOCK: timm.create_model, **{FAST if i == 'auto' else f'{FAST} {i}': partial(_accelerated, impl=i)
                                           for i in impls}, **({BOUND: _bound} if bound else {})}
    return [bench.ModelSpec(f'{name} {kind}', partial(make, name), timm.get_pretrained_cfg(name).input_size[-1])
            for name in names for kind, make in makers.items()]


def ratios(results: List[bench.ModelResult], names: List[str]) -> List[dict]:
    """Per model and mode: ms per step of each contender and its speedup (stock's time / its time)."""
    by_label = {(r.label, r.mode): r for r in results}
    kinds = list(dict.fromkeys(r.label.split(' ', 1)[1] for r in results))
    runs = {(name, mode): {k: by_label[f'{name} {k}', mode] for k in kinds}  # each contender's result
            for mode in dict.fromkeys(r.mode for r in results) for name in names}
    return [dict(model=name, img_size=c[STOCK].img_size, mode=mode, ms={k: r.seconds * 1e3 for k, r in c.items()},
                 speedup={k: c[STOCK].seconds / r.seconds for k, r in c.items()}) for (name, mode), c in runs.items()]


def format_tables(rows: List[dict]) -> Tuple[str, str]:  # (ms and speedup of each contender, the goals)
    kinds = [k for k in rows[0]['ms'] if k != STOCK]
    cells = [dict(r, **{k: f"{r['ms'][k]:.1f} ({r['speedup'][k]:.2f}x)" for k in kinds}) for r in rows]
    columns = ['model', ('input', 'img_size', '{}'), 'mode', (f'{STOCK} ms', 'ms', lambda ms: f'{ms[STOCK]:.1f}')]
    goals = [dict(r, target=f">= {GOALS[r['mode']]:g}x", met='yes' if r['speedup'][FAST] >= GOALS[r['mode']] else 'no',
                  **{k: f"{r['speedup'][k]:.2f}x" for k in kinds})
             for r in rows if r['model'] in GOAL_MODELS and r['mode'] in GOALS]
    return (bench.table(columns + [(f'{k} ms (speedup)', k, '{}') for k in kinds], cells),
            bench.table(['model', 'mode', 'target', *kinds, ('met (accelerated)', 'met', '{}')], goals))


def main() -> None:
    parser = script_parser(__doc__, cpu_batch_size=2)
    parser.add_argument('--models', nargs='+', default=MODELS, choices=MODELS, metavar='NAME', help='default: all 7')
    parser.add_argument('--no-train', action='store_true', help='inference only: skip the train step')
    parser.add_argument('--attn-impl', nargs='+', default=['auto'], choices=['auto', *ATTN_IMPLS],
                        help="accelerated contenders, one per kernel choice (default: auto; e.g. auto tiled)")
    parser.add_argument('--no-bound', action='store_true', help='skip the no-attention bound')
    args = parser.parse_args()
    if args.compile or args.channels_last or args.amp:
        parser.error('--compile, --channels-last and --amp are not part of this comparison')
    bench.resolve_run(args, parser)
    load_before = os.getloadavg()
    results = bench.measure_modes(contenders(args.models, args.attn_impl, not args.no_bound), args,
                                  (False, True)[:2 - args.no_train])
    before, after = ('/'.join(f'{v:.1f}' for v in load) for load in (load_before, os.getloadavg()))
    header = (bench.run_header('timm halo models, stock vs accelerated', args)
              + f' | load average (1/5/15 min) before {before}, after {after} on {os.cpu_count()} cores')
    ratio_table, goals_table = format_tables(ratio_rows := ratios(results, args.models))
    print(f'{header}\n{bench.format_table(results)}\n\n{ratio_table}')
    if any(n in args.models for n in GOAL_MODELS):
        print(f'\nGoals (CPU, 256 px):\n{goals_table}')
    save_results(args, 'accelerate', header, rows=[vars(r) for r in results], ratios=ratio_rows, goals=GOALS,
                 goal_models=GOAL_MODELS)


if __name__ == '__main__':
    main()
