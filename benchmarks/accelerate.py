"""timm's pretrained halo models, stock vs ``timm_halo.accelerate``: inference and train step, whole model.

    python -m benchmarks.accelerate [--models NAME ...] [--attn-impl IMPL ...] [--batch-size N] [--repeats N]
                                    [--threads N] [--load N] [--no-train] [--no-bound] [--json PATH] [--plot PATH]

Contenders per model, at its native resolution (256 px; haloregnetz_b 224 px), random init:

* ``stock``: ``timm.create_model(name)``, timm's ``HaloAttn``;
* ``accelerated``: the same model after ``timm_halo.accelerate`` (our kernels, ``attn_impl='auto'``), and one
  more contender per other kernel named in ``--attn-impl`` (e.g. ``--attn-impl auto tiled`` adds ``accelerated
  tiled``, the tiled kernel for every call);
* ``no-attention bound`` (unless ``--no-bound``): every ``HaloAttn`` keeps its q/kv projections (1x1 convs, the
  same in both) but the attention itself is free (the output is a strided slice of the values plus one query
  channel). No attention kernel can make the model faster than this: the row says how much of the model's time
  the attention is at all.

The train step is fwd + cross-entropy + bwd (no optimizer step). Every contender lives in one process and all are
timed round-robin (medians, ``timm_halo.bench``); the ratio column is stock's time / the contender's. Defaults:
batch 2, 5 repeats, all seven models.
"""
import argparse
import os
from functools import partial
from typing import Callable, Dict, List

import timm
import torch
from timm.layers.halo_attn import HaloAttn

from benchmarks.plot import save_results
from timm_halo import accelerate
from timm_halo.bench import (
    ModelResult,
    ModelSpec,
    add_run_args,
    busy_load,
    format_table,
    measure_models,
    resolve_run,
    run_header,
)
from timm_halo.layers import ATTN_IMPLS

MODELS = ['halonet26t', 'sehalonet33ts', 'halonet50ts', 'eca_halonext26ts', 'haloregnetz_b',
          'lamhalobotnet50ts_256', 'halo2botnet50ts_256']
STOCK, FAST, BOUND = 'stock', 'accelerated', 'no-attention bound'
TARGETS = {'infer': 2.0, 'train': 1.5}  # goals: halonet26t and halonet50ts at 256 px, CPU
TARGET_MODELS = ('halonet26t', 'halonet50ts')


class _FreeAttention(HaloAttn):
    """``HaloAttn`` with its q/kv projections and output shape, and no attention (for the bound only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x)
        v = self.kv(x)[:, -self.dim_out_v:, ::self.block_stride, ::self.block_stride]
        return self.pool(v + q[:, :1])


def _bound(name: str) -> torch.nn.Module:
    model = timm.create_model(name)
    for m in model.modules():
        if type(m) is HaloAttn:
            m.__class__ = _FreeAttention
    return model


def _native_size(name: str) -> int:
    return timm.get_pretrained_cfg(name).input_size[-1]


def contenders(names: List[str], impls: List[str], bound: bool) -> List[ModelSpec]:
    makers: Dict[str, Callable[[str], torch.nn.Module]] = {STOCK: timm.create_model}
    for impl in impls:
        makers[_fast_label(impl)] = partial(_accelerated, impl=impl)
    if bound:
        makers[BOUND] = _bound
    return [ModelSpec(f'{name} {kind}', partial(make, name), _native_size(name))
            for name in names for kind, make in makers.items()]


def _accelerated(name: str, impl: str) -> torch.nn.Module:
    model = timm.create_model(name)
    # The GMACs are counted on the meta device, where only the plain kernels run (same MACs).
    on_meta = next(model.parameters()).device.type == 'meta'
    return accelerate(model, attn_impl='auto' if on_meta else impl)


def _fast_label(impl: str) -> str:
    return FAST if impl == 'auto' else f'{FAST} {impl}'


def ratios(results: List[ModelResult], names: List[str]) -> List[dict]:
    """Per model and mode: ms per step of each contender and its speedup (stock's time / its time)."""
    by_label = {(r.label, r.mode): r for r in results}
    kinds = list(dict.fromkeys(r.label.split(' ', 1)[1] for r in results))
    rows = []
    for mode in dict.fromkeys(r.mode for r in results):
        for name in names:
            stock = by_label[f'{name} {STOCK}', mode]
            row = dict(model=name, img_size=stock.img_size, mode=mode, ms={}, speedup={})
            for kind in kinds:
                r = by_label[f'{name} {kind}', mode]
                row['ms'][kind] = r.seconds * 1e3
                row['speedup'][kind] = stock.seconds / r.seconds
            rows.append(row)
    return rows


def format_ratios(rows: List[dict]) -> str:
    kinds = [k for k in rows[0]['ms'] if k != STOCK]
    lines = [f'| model | input | mode | {STOCK} ms | ' + ' | '.join(f'{k} ms (speedup)' for k in kinds) + ' |',
             '|---|---|---|---|' + '---|' * len(kinds)]
    for r in rows:
        cells = ' | '.join(f"{r['ms'][k]:.1f} ({r['speedup'][k]:.2f}x)" for k in kinds)
        lines.append(f"| {r['model']} | {r['img_size']} | {r['mode']} | {r['ms'][STOCK]:.1f} | {cells} |")
    return '\n'.join(lines)


def format_targets(rows: List[dict]) -> str:
    kinds = [k for k in rows[0]['ms'] if k != STOCK]
    lines = ['| model | mode | target | ' + ' | '.join(kinds) + ' | met (accelerated) |',
             '|---|---|---|' + '---|' * len(kinds) + '---|']
    for r in rows:
        if r['model'] in TARGET_MODELS and r['mode'] in TARGETS:
            target = TARGETS[r['mode']]
            cells = ' | '.join(f"{r['speedup'][k]:.2f}x" for k in kinds)
            met = 'yes' if r['speedup'][FAST] >= target else 'no'
            lines.append(f"| {r['model']} | {r['mode']} | >= {target:g}x | {cells} | {met} |")
    return '\n'.join(lines)


def plot(data: dict, path: str) -> None:
    """Speedup over stock per model (accelerated, and the no-attention bound), inference and train step."""
    import matplotlib

    matplotlib.use('Agg')
    import textwrap

    import matplotlib.pyplot as plt

    from benchmarks.plot import _grouped_bars

    rows = data['ratios']
    modes = list(dict.fromkeys(r['mode'] for r in rows))
    fig = plt.figure(figsize=(15, 5), layout='constrained')
    for ax, mode in zip(fig.subplots(1, len(modes), squeeze=False)[0], modes):
        sel = [r for r in rows if r['mode'] == mode]
        series = {k: [r['speedup'][k] for r in sel] for k in sel[0]['speedup'] if k != STOCK}
        _grouped_bars(ax, [r['model'] for r in sel], series, 'speedup over stock (x)',
                      f'{mode}: stock time / contender time (higher is better)')
        ax.axhline(1.0, color='grey', lw=0.8)
        if mode in TARGETS:
            ax.axhline(TARGETS[mode], color='red', lw=0.8, ls='--',
                       label=f'goal {TARGETS[mode]:g}x ({", ".join(TARGET_MODELS)})')
        ax.tick_params(axis='x', labelrotation=20)
        ax.legend(fontsize=8)
    fig.suptitle(textwrap.fill(data['header'], 200), fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(parser, cpu_batch_size=2)
    parser.add_argument('--models', nargs='+', default=MODELS, choices=MODELS, metavar='NAME',
                        help='default: all seven')
    parser.add_argument('--no-train', action='store_true', help='inference only: skip the train step')
    parser.add_argument('--attn-impl', nargs='+', default=['auto'], choices=['auto', *ATTN_IMPLS],
                        help="accelerated contenders, one per kernel choice (default: auto; e.g. auto tiled)")
    parser.add_argument('--no-bound', action='store_true', help='skip the no-attention bound')
    parser.add_argument('--plot', metavar='PATH', help='also draw the speedups as a PNG (needs matplotlib)')
    args = parser.parse_args()
    if args.compile or args.channels_last or args.amp:
        parser.error('--compile, --channels-last and --amp are not part of this comparison')
    device, _, batch_size, repeats = resolve_run(args, parser)
    load_before = os.getloadavg()

    specs = contenders(args.models, args.attn_impl, bound=not args.no_bound)
    results: List[ModelResult] = []
    for train in (False,) if args.no_train else (False, True):
        with busy_load(args.load):
            results += measure_models(specs, device, batch_size, train=train, repeats=repeats, warmup=args.warmup)
    load_after = os.getloadavg()
    header = run_header(device, f'timm halo models, stock vs accelerated, batch {batch_size}, {repeats} repeats',
                        args)
    header += (f' | load average (1/5/15 min) before {"/".join(f"{v:.1f}" for v in load_before)}, after '
               f'{"/".join(f"{v:.1f}" for v in load_after)} on {os.cpu_count()} cores')
    print(header)
    print(format_table(results))
    ratio_rows = ratios(results, args.models)
    print()
    print(format_ratios(ratio_rows))
    if any(n in args.models for n in TARGET_MODELS):
        print('\nIssue 13 targets (CPU, 256 px):')
        print(format_targets(ratio_rows))
    data = dict(benchmark='accelerate', header=header, args=vars(args), rows=[r.as_dict() for r in results],
                ratios=ratio_rows)
    save_results(data, args.json, args.plot, draw=plot)


if __name__ == '__main__':
    main()
