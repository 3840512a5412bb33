"""What the benchmark scripts share: their parser, ``--json`` / ``--plot`` outputs, and PNGs of any ``--json`` file."""
import argparse
import json
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional

from timm_halo.bench import add_run_args, write_json


def script_parser(doc: str, cpu_batch_size: Optional[int] = None) -> argparse.ArgumentParser:
    """A script's parser with ``--plot`` and ``timm_halo.bench.add_run_args``' options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(parser, cpu_batch_size)
    parser.add_argument('--plot', metavar='PATH', help='also draw the results as a PNG (needs matplotlib)')
    return parser


def yes_no(met: bool) -> str:
    return 'yes' if met else 'NO'


def _grouped_bars(ax, groups: List[str], series: Dict[str, List[float]], ylabel: str, title: str,
                  rotation: float = 0) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar_label(ax.bar(xs, values, width, label=name), fmt='%.3g', fontsize=7)
    ax.set_xticks(range(len(groups)), groups, fontsize=8, rotation=rotation)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8)


def _plot_layer(data: Dict[str, Any], fig) -> None:
    """fwd, fwd+bwd and peak memory per shape; with ``data['loaded']`` (``--loaded``), quiet vs under load."""
    loaded = data.get('loaded')
    runs = {'quiet': data, **({f"{loaded['rows'][0].get('load', '?')} busy process(es)": loaded} if loaded else {})}
    # One row per shape: the shapes' times differ by 10x or more, so they get their own axes.
    shapes = list(dict.fromkeys(r['shape'] for r in data['rows']))
    fig.set_size_inches(15, 1 + 4 * len(shapes))
    for row_axes, shape in zip(fig.subplots(len(shapes), 3, squeeze=False), shapes):
        impls = [r['impl'] for r in data['rows'] if r['shape'] == shape]
        for ax, key, label in zip(row_axes, ('fwd_ms', 'fwd_bwd_ms', 'peak_mb'), ('fwd ms', 'fwd+bwd ms', 'peak MB')):
            series = {name: [next((r[key] for r in run['rows'] if (r['shape'], r['impl']) == (shape, i)), 0.0)
                             for i in impls] for name, run in runs.items()}
            _grouped_bars(ax, impls, series, label, f'{shape}: {label} (lower is better)')


def _plot_model(data: Dict[str, Any], fig) -> None:
    by_key = {(f"{r['label']} @{r['img_size']}", r['mode']): r for r in data['rows']}
    labels, modes = (list(dict.fromkeys(k[i] for k in by_key)) for i in (0, 1))
    for ax, key, label in zip(fig.subplots(1, 2), ('img_per_s', 'gmac_per_s'), ('img/s', 'GMAC/s')):
        series = {m: [by_key[lb, m][key] if (lb, m) in by_key else 0.0 for lb in labels] for m in modes}
        _grouped_bars(ax, labels, series, label, label + ' (higher is better)', rotation=20)


def _plot_resolution(data: Dict[str, Any], fig) -> None:
    rows, tol = data['rows'], data.get('tolerance_pct', 15.0)
    axes = fig.subplots(1, 2)
    for i, mode in enumerate(dict.fromkeys(r['mode'] for r in rows)):
        sel = [r for r in rows if r['mode'] == mode]
        sizes = [r['img_size'] for r in sel]
        axes[0].plot(sizes, [r['ms_per_mpix'] for r in sel], 'o-', label=mode)
        axes[1].plot(sizes, [r['time_deviation_pct'] for r in sel], 'o-', label=f'{mode} time')
        if i == 0:  # the MAC count is the same for every mode
            axes[1].plot(sizes, [r['gmacs_deviation_pct'] for r in sel], 'x--', color='grey', label='GMACs')
    axes[0].set(xlabel='input size (px)', ylabel='ms per megapixel', ylim=(0, None),
                title='cost per pixel (flat = linear in pixel count)')
    axes[1].axhspan(-tol, tol, color='green', alpha=0.1, label=f'target ±{tol:g}%')
    axes[1].axhline(0, color='grey', lw=0.5)
    axes[1].set(xlabel='input size (px)', ylabel='% deviation from linear',
                title=f'deviation from linear, normalised to {rows[0]["img_size"]}px')
    for ax in axes:
        ax.legend(fontsize=8)


def _plot_accelerate(data: Dict[str, Any], fig) -> None:
    """Speedup over stock per model (accelerated, and the no-attention bound), inference and train step."""
    rows, goals = data['ratios'], data.get('goals', {})
    modes = list(dict.fromkeys(r['mode'] for r in rows))
    for ax, mode in zip(fig.subplots(1, len(modes), squeeze=False)[0], modes):
        sel = [r for r in rows if r['mode'] == mode]
        ax.axhline(1.0, color='grey', lw=0.8)
        if mode in goals:
            ax.axhline(goals[mode], color='red', lw=0.8, ls='--',
                       label=f'goal {goals[mode]:g}x ({", ".join(data.get("goal_models", []))})')
        series = {k: [r['speedup'][k] for r in sel] for k in sel[0]['speedup'] if k != 'stock'}
        _grouped_bars(ax, [r['model'] for r in sel], series, 'speedup over stock (x)',
                      f'{mode}: stock time / contender time (higher is better)', rotation=20)


_PLOTTERS = {'layer': _plot_layer, 'model': _plot_model, 'resolution': _plot_resolution, 'accelerate': _plot_accelerate}


def plot(data: Dict[str, Any], path: str) -> None:
    """Write a PNG of one benchmark's results (the dict a script writes with ``--json``)."""
    from matplotlib.figure import Figure  # no pyplot: no backend, no display, nothing to close

    kind = data.get('benchmark')
    if kind not in _PLOTTERS:
        raise ValueError(f'unknown benchmark kind {kind!r}; expected one of {sorted(_PLOTTERS)}')
    fig = Figure(figsize=(15, 5), layout='constrained')  # a layer plot grows by a row per shape
    _PLOTTERS[kind](data, fig)
    fig.suptitle(textwrap.fill(data.get('header', kind), 200), fontsize=8)
    fig.savefig(path, dpi=110)
    print(f'wrote {path}')


def save_results(args: argparse.Namespace, benchmark: str, header: str, **data: Any) -> None:
    """A benchmark script's ``--json`` and ``--plot`` outputs: ``data``, with the header and the options."""
    data = dict(benchmark=benchmark, header=header, args=vars(args), **data)
    write_json(data, args.json)
    if args.plot:
        plot(data, args.plot)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('json_path', help='file written by a benchmark with --json')
    parser.add_argument('-o', '--output', help='PNG to write (default: the JSON path with .png)')
    parser.add_argument('--loaded', metavar='JSON', help='a layer run with --load N: plot quiet vs loaded')
    args = parser.parse_args()
    data = json.loads(Path(args.json_path).read_text())
    if args.loaded:
        data['loaded'] = json.loads(Path(args.loaded).read_text())
    plot(data, args.output or str(Path(args.json_path).with_suffix('.png')))


if __name__ == '__main__':
    main()
