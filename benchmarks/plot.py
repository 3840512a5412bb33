"""Draw the JSON that a benchmark wrote with ``--json`` as a PNG (needs matplotlib).

    python -m benchmarks.plot RESULTS.json [-o OUT.png]
    python -m benchmarks.plot layer_quiet.json --loaded layer_load1.json -o layer_load.png

The scripts' ``--plot PATH`` option calls the same code directly.
"""
import argparse
import json
import os
import textwrap
from typing import Any, Callable, Dict, List, Optional


def _grouped_bars(ax, groups: List[str], series: Dict[str, List[float]], ylabel: str, title: str) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt='%.3g', fontsize=7)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)


def _plot_layer(data: Dict[str, Any], fig) -> None:
    # One row per shape: the shapes' times differ by 10x or more, so they get their own axes.
    rows = data['rows']
    shapes = list(dict.fromkeys(r['shape'] for r in rows))
    impls = list(dict.fromkeys(r['impl'] for r in rows))
    by_key = {(r['shape'], r['impl']): r for r in rows}
    colors = {impl: f'C{i}' for i, impl in enumerate(impls)}
    axes = fig.subplots(len(shapes), 3, squeeze=False)
    for row_axes, shape in zip(axes, shapes):
        present = [i for i in impls if (shape, i) in by_key]
        for ax, key, label in zip(row_axes, ('fwd_ms', 'fwd_bwd_ms', 'peak_mb'), ('fwd ms', 'fwd+bwd ms', 'peak MB')):
            bars = ax.bar(present, [by_key[shape, i][key] for i in present], color=[colors[i] for i in present])
            ax.bar_label(bars, fmt='%.3g', fontsize=7)
            ax.set_title(f'{shape}: {label} (lower is better)', fontsize=9)
            ax.tick_params(axis='x', labelsize=8)


def _plot_model(data: Dict[str, Any], fig) -> None:
    rows = data['rows']
    labels = list(dict.fromkeys(f"{r['label']} @{r['img_size']}" for r in rows))
    modes = list(dict.fromkeys(r['mode'] for r in rows))
    by_key = {(f"{r['label']} @{r['img_size']}", r['mode']): r for r in rows}
    axes = fig.subplots(1, 2)
    for ax, key, label in zip(axes, ('img_per_s', 'gmac_per_s'), ('img/s', 'GMAC/s')):
        series = {m: [by_key[lb, m][key] if (lb, m) in by_key else 0.0 for lb in labels] for m in modes}
        _grouped_bars(ax, labels, series, label, label + ' (higher is better)')
        ax.tick_params(axis='x', labelrotation=20)
    axes[0].legend(fontsize=8)


def _plot_resolution(data: Dict[str, Any], fig) -> None:
    rows = data['rows']
    tol = data.get('tolerance_pct', 15.0)
    axes = fig.subplots(1, 2)
    for i, mode in enumerate(dict.fromkeys(r['mode'] for r in rows)):
        sel = [r for r in rows if r['mode'] == mode]
        sizes = [r['img_size'] for r in sel]
        axes[0].plot(sizes, [r['ms_per_mpix'] for r in sel], 'o-', label=mode)
        axes[1].plot(sizes, [r['time_deviation_pct'] for r in sel], 'o-', label=f'{mode} time')
        if i == 0:  # the MAC count is the same for every mode
            axes[1].plot(sizes, [r['gmacs_deviation_pct'] for r in sel], 'x--', color='grey', label='GMACs')
    axes[0].set_xlabel('input size (px)')
    axes[0].set_ylabel('ms per megapixel')
    axes[0].set_title('cost per pixel (flat = linear in pixel count)', fontsize=10)
    axes[0].set_ylim(bottom=0)
    axes[1].axhspan(-tol, tol, color='green', alpha=0.1, label=f'target ±{tol:g}%')
    axes[1].axhline(0, color='grey', lw=0.5)
    axes[1].set_xlabel('input size (px)')
    axes[1].set_ylabel('% deviation from linear')
    axes[1].set_title(f'deviation from linear, normalised to {rows[0]["img_size"]}px', fontsize=10)
    for ax in axes:
        ax.legend(fontsize=8)


_PLOTTERS = {'layer': _plot_layer, 'model': _plot_model, 'resolution': _plot_resolution}


def plot_quiet_vs_loaded(quiet: Dict[str, Any], loaded: Dict[str, Any], path: str) -> None:
    """fwd+bwd time of every layer contender, quiet and under load (two ``benchmarks.layer --json`` files)."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r['shape'] for r in quiet['rows']))
    fig = plt.figure(figsize=(15, 4 * len(shapes)), layout='constrained')
    axes = fig.subplots(len(shapes), 1, squeeze=False)[:, 0]
    load = loaded['rows'][0].get('load', '?')
    for ax, shape in zip(axes, shapes):
        impls = [r['impl'] for r in quiet['rows'] if r['shape'] == shape]
        series = {}
        for name, data in (('quiet', quiet), (f'{load} busy process(es)', loaded)):
            by_impl = {r['impl']: r['fwd_bwd_ms'] for r in data['rows'] if r['shape'] == shape}
            series[name] = [by_impl.get(i, 0.0) for i in impls]
        _grouped_bars(ax, impls, series, 'fwd+bwd ms', f'{shape}: fwd+bwd ms, quiet vs loaded (lower is better)')
        ax.legend(fontsize=8)
    fig.suptitle(textwrap.fill(quiet.get('header', 'layer'), 200), fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(data: Dict[str, Any], path: str) -> None:
    """Write a PNG of one benchmark's results (the dict a script writes with ``--json``)."""
    import matplotlib

    matplotlib.use('Agg')  # files only; works without a display
    import matplotlib.pyplot as plt

    kind = data.get('benchmark')
    if kind not in _PLOTTERS:
        raise ValueError(f'unknown benchmark kind {kind!r}; expected one of {sorted(_PLOTTERS)}')
    shapes = len({r['shape'] for r in data['rows']}) if kind == 'layer' else 1
    fig = plt.figure(figsize=(15, 1 + 4 * shapes), layout='constrained')
    _PLOTTERS[kind](data, fig)
    fig.suptitle(textwrap.fill(data.get('header', kind), 200), fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_results(data: Dict[str, Any], json_path: Optional[str], png_path: Optional[str],
                 draw: Optional[Callable[[Dict[str, Any], str], None]] = None) -> None:
    """A benchmark script's ``--json`` and ``--plot`` outputs: the JSON file, and a PNG drawn by ``draw``
    (default: ``plot``)."""
    from timm_halo.bench import write_json

    write_json(data, json_path)
    if png_path:
        (draw or plot)(data, png_path)
        print(f'wrote {png_path}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('json_path', help='file written by a benchmark with --json')
    parser.add_argument('-o', '--output', help='PNG to write (default: the JSON path with .png)')
    parser.add_argument('--loaded', metavar='JSON', help='a layer run with --load N: plot quiet vs loaded')
    args = parser.parse_args()
    with open(args.json_path) as f:
        data = json.load(f)
    out = args.output or os.path.splitext(args.json_path)[0] + '.png'
    if args.loaded:
        with open(args.loaded) as f:
            plot_quiet_vs_loaded(data, json.load(f), out)
    else:
        plot(data, out)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
