"""The `timm-halo` command: a bad argument exits 2, a failure 1, with one error line; global options go anywhere."""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, List, Optional

import timm
import torch
from huggingface_hub.utils import tqdm
from timm.utils import ParseKwargs

import timm_halo
from timm_halo import bench, hub
from timm_halo.models.halonet import FAMILY

# The options of the default command `info`, which the main parser takes too: name -> argparse keywords
GLOBAL_OPTIONS = dict(model=dict(help='model name'),
                      img_size=dict(type=int, help="(square) input size (default: the model's own)"),
                      batch_size=dict(type=int, help='images per batch'),
                      skip_family=dict(action='store_true', help='skip the family table'))


class ModelKwargs(ParseKwargs):
    """timm train.py's ``--model-kwargs`` (``key=value`` pairs, values as Python literals), refusing a bare value."""

    def __call__(self, parser, namespace, values, option_string=None):
        if bad := [v for v in values if '=' not in v]:
            parser.error(f'{option_string} takes key=value pairs such as depths="(1, 1, 1, 1)", got {bad[0]!r}')
        super().__call__(parser, namespace, values, option_string)


def fail(command: str, message: Any) -> int:
    print(f'timm-halo {command}: error: {" ".join(str(message).split())}', file=sys.stderr)
    return 1


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace, lowest_size: int = 32,
                halonets_only: bool = True) -> None:
    if not (hub.is_halonet(args.model) if halonets_only else timm.is_model(args.model)):
        parser.error(f'unknown model {args.model!r}' + (f'; choose from {", ".join(FAMILY)}' if halonets_only else ''))
    if args.img_size is not None and args.img_size < lowest_size:
        parser.error(f'--img-size must be an integer >= {lowest_size}, got {args.img_size}')
    if getattr(args, 'batch_size', None) is not None and args.batch_size < 1:
        parser.error(f'--batch-size must be >= 1, got {args.batch_size}')


def cmd_info(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _check_args(parser, args)
    print(f'timm-halo {timm_halo.__version__} | timm {timm.__version__} | torch {torch.__version__} | '
          f'{torch.get_num_threads()} CPU threads\n')
    if not args.skip_family:
        rows = [bench.summarize(name) for name in tqdm(FAMILY, desc='measuring the family', unit='model')]
        print('HaloNet family: params measured here vs the paper; GMACs of one image at the input size')
        print(f'{"model":<12}{"input":>6}{"params":>9}{"paper":>8}{"diff":>8}{"GMACs":>8}{"top-1*":>8}')
        for r in rows:
            print(f"{r['name']:<12}{r['img_size']:>6}{r['params_m']:>8.2f}M{r['paper_params_m']:>7.1f}M"
                  f"{r['params_diff_pct']:>+7.2f}%{r['gmacs']:>8.2f}{r['paper_top1']:>8.1f}")
        print('* ImageNet top-1 reported in the paper; no weights ship with this package yet.\n')

    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    size = args.img_size or model.pretrained_cfg['input_size'][-1]
    x = torch.randn(args.batch_size, 3, size, size)
    with torch.no_grad():
        start = time.perf_counter()
        logits = model(x)
        print(f'timm.create_model({args.model!r}) -> {type(model).__module__}.{type(model).__name__}')
        print(f'  forward {tuple(x.shape)} -> logits {tuple(logits.shape)} in {time.perf_counter() - start:.2f}s')
        features = timm.create_model(args.model, features_only=True).eval()
        print('  features_only pyramid:')
        for info, fmap in zip(features.feature_info.get_dicts(), features(x)):
            print(f'    {info["module"]:<12} reduction {info["reduction"]:>2}  {tuple(fmap.shape)}')
        # The fast path the model just ran, held against the dense reference on its first attention layer.
        attn = model.stages[0].blocks[0].attn
        probe = torch.randn(1, attn.dim, 13, 11)
        diff = (attn(probe) - attn.reference_forward(probe)).abs().max().item()
    print(f'  HaloAttention fast path vs dense reference (13x11 map, masked borders): max |diff| {diff:.1e}')
    return 0


def cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _check_args(parser, args, halonets_only=False)
    bench.resolve_run(args, parser)
    results = bench.measure_modes([bench.timm_spec(args.model, args.img_size)], args, (False, True)[:1 + args.train])
    header = bench.run_header(f'timm-halo bench {args.model}', args)
    print(f'{header}\n{bench.format_table(results)}')
    bench.write_json(dict(benchmark='model', header=header, args=vars(args), rows=[vars(r) for r in results]),
                     args.json)
    return 0


def cmd_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from timm_halo import export as ex

    _check_args(parser, args, lowest_size=1)
    if not args.atol >= 0:
        parser.error('--atol must be >= 0')
    output = Path(args.output or f'{args.model}.onnx')
    torch.manual_seed(0)  # as `timm-halo info`: the same untrained weights on every run
    try:
        model = timm.create_model(args.model, **args.model_args).eval()
    except (TypeError, ValueError) as e:
        parser.error(f'cannot build {args.model} with --model-args {args.model_args}: {e}')
    ex.wake_residual_branches(model)  # else timm's zero-init of each residual branch would hide every attention
    example = ex.example_input(model, args.img_size, args.batch_size)
    print(f'exporting {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) to {output} '
          f'for input {"x".join(map(str, example.shape))} (dynamic batch'
          f'{", height and width" if args.dynamic_size else ""}) ...', flush=True)
    try:
        ex.export_onnx(model, output, example, dynamic_batch=True, dynamic_size=args.dynamic_size)
    except OSError as e:
        return fail('export', f'cannot write --output {output}: {e}')
    report = ex.onnx_parity(output, model, ex.parity_inputs(model, example, True, args.dynamic_size), args.atol)
    print(f'wrote {output} ({output.stat().st_size / 1e6:.1f} MB)\nONNX Runtime vs PyTorch: {report}')
    return 0 if report.ok else fail('export', f'{output} does not match PyTorch within --atol {args.atol:g}')


def cmd_hub_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    # --model may come from the checkpoint (a train.py checkpoint's args); export_for_hub checks it then
    problem = args.model and hub.export_args_problem(args.model, args.model_args, args.img_size)
    if problem or (args.num_classes or 0) < 0:
        parser.error(problem or f'--num-classes must be >= 0 (0 drops the classifier), got {args.num_classes}')
    labels = args.labels and [line.strip() for line in Path(args.labels).read_text().splitlines() if line.strip()]
    summary = hub.export_for_hub(args.checkpoint, args.output, args.model, label_names=labels, **{
        k: getattr(args, k) for k in ('num_classes', 'model_args', 'dataset', 'repo_id', 'overwrite', 'img_size')})
    if summary['from_checkpoint']:
        print("from the checkpoint's training args: " + '; '.join(summary['from_checkpoint']))
    for note in summary['notes']:
        print(f'timm-halo hub-export: note: {note}', file=sys.stderr)
    print(f"wrote {summary['output']}: {', '.join(summary['files'])}\n"
          f"  {summary['architecture']}: {summary['params'] / 1e6:.2f}M params, {summary['num_classes']} classes, "
          f"{summary['in_chans']} input channels, input size {summary['input_size']}\n"
          f"  reloaded through timm.create_model('local-dir:{summary['output']}', pretrained=True): "
          f"max |logit diff| {summary['reload_max_abs_diff']:g}")
    repo = args.repo_id or '<repo id>'
    print(f"next: hf upload {repo} {summary['output']}   " + (
        f"(then timm.create_model('hf-hub:{repo}', pretrained=True))" if args.repo_id else
        f"(a Hub repo id such as your-name/{Path(summary['output']).resolve().name}; --repo-id puts it in the card)"))
    return 0


def cmd_hub_inspect(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    info = hub.inspect_hub_model(args.source, load=not args.no_load)
    for kind, message in [(k, m) for k in ('warning', 'note') for m in info[f'{k}s']]:
        print(f'timm-halo hub-inspect: {kind}: {" ".join(message.split())}', file=sys.stderr)
    cfg, classes = info['pretrained_cfg'], info['num_classes']
    built = info.get('num_classes_built', classes)
    rows = dict(source=info['source'], architecture=info['architecture'])
    if 'params' in info:
        loaded = ('loaded, but timm re-initialised its classifier at random (see the warning)'
                  if info['classifier_reinitialised'] else 'loaded strictly')
        rows.update(params=f"{info['params'] / 1e6:.2f}M ({info['params']:,}), {loaded}; all weights finite: "
                           f"{'yes' if info['weights_finite'] else 'NO'}",
                    GMACs=f"{info['gmacs']:.2f} at {cfg.get('input_size')}", settings=json.dumps(info['settings']))
    rows.update(num_classes=f'{classes}' + (f" ({info['label_names']} label names)" if info['label_names'] else '')
                + (f'; the model was built with {built}' if built != classes else ''),
                input=f"{cfg.get('input_size')}, {cfg.get('interpolation')}, crop_pct {cfg.get('crop_pct')}, "
                      f"mean {cfg.get('mean')}, std {cfg.get('std')}", model_args=json.dumps(info['model_args']),
                files=', '.join(f'{n} ({s / 1e6:.2f} MB)' for n, s in info['files'].items()))
    print('\n'.join(f'{name:<14}{value}' for name, value in rows.items()))
    print('pretrained_cfg ' + json.dumps({k: v for k, v in cfg.items() if k != 'label_names'}, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-halo', description='HaloNet backbones for timm (README.md).')
    for name, kwargs in GLOBAL_OPTIONS.items():
        parser.add_argument('--' + name.replace('_', '-'), default=None, **kwargs)
    sub = parser.add_subparsers(dest='command', metavar='{info,bench,export,hub-export,hub-inspect}')

    def command(name, handler, help: str, *options: str, **defaults) -> argparse.ArgumentParser:
        """A subcommand taking the global ``options`` (not given unless given; ``defaults`` fill them later)."""
        p = sub.add_parser(name, help=help, description=help)
        for option in options:
            p.add_argument('--' + option.replace('_', '-'), default=argparse.SUPPRESS, **GLOBAL_OPTIONS[option])
        p.handler, p.global_options, p.global_defaults = handler, set(options), defaults
        return p

    command('info', cmd_info, 'show the H0-H7 family and run a forward pass of --model (the default command)',
            *GLOBAL_OPTIONS, model='halonet_h0', batch_size=1)
    p = command('bench', cmd_bench, "time any timm model's inference (and train step): img/s, GMACs, GMAC/s "
                '(docs/benchmarks.md)', 'model', 'img_size', model='halonet_h1')
    p.add_argument('--train', action='store_true', help='also time a train step (fwd+bwd)')
    bench.add_run_args(p)  # --batch-size among them
    p.global_options.add('batch_size')

    p = command('export', cmd_export, 'export a model to ONNX and check it against PyTorch in ONNX Runtime; exits 1 '
                'past --atol (docs/deployment.md)', 'model', 'img_size', 'batch_size', model='halonet_h0', batch_size=2)
    p.add_argument('--format', default='onnx', choices=['onnx'], help='export format (default: onnx)')
    p.add_argument('--output', default=None, help='file to write (default: <model>.onnx)')
    p.add_argument('--dynamic-size', action='store_true',
                   help='also make height/width dynamic (slow to export; checked at a second size)')
    p.add_argument('--atol', type=float, default=1e-4, help='parity tolerance (default: 1e-4)')
    p.add_argument('--model-args', nargs='*', default={}, action=ModelKwargs,
                   help='constructor kwargs as key=value, e.g. num_classes=10 depths="(1, 1, 1, 1)"')

    p = command('hub-export', cmd_hub_export, 'write a Hub-ready folder (weights, config.json, model card) for a '
                "checkpoint; a train.py checkpoint's args supply --model, --img-size, --model-args (docs/hub.md)",
                'model', 'img_size')
    p.add_argument('--checkpoint', required=True, help='.safetensors, or .pth/.pth.tar/.bin (weights only)')
    p.add_argument('--output', required=True, help='folder to write')
    p.add_argument('--num-classes', type=int, default=None,
                   help="the checkpoint's classes (default: read from its classifier); 0 drops the classifier")
    p.add_argument('--model-args', nargs='*', default={}, action=ModelKwargs,
                   help='constructor kwargs the checkpoint was trained with, e.g. depths="(1, 1, 1, 1)"')
    p.add_argument('--labels', default=None, help='text file with one class name per line')
    p.add_argument('--dataset', default=None, help='training data, for the model card (e.g. ImageNet-1k); a Hub '
                   'dataset id (owner/name) also becomes its datasets: metadata')
    p.add_argument('--repo-id', default=None, help='Hub repo it is meant for, for the model card')
    p.add_argument('--overwrite', action='store_true', help='allow a non-empty output folder')

    p = command('hub-inspect', cmd_hub_inspect, 'show architecture, params and config of a Hub-ready folder or repo')
    p.add_argument('source', help="folder, 'org/name' Hub repo, or a 'local-dir:' / 'hf-hub:' name")
    p.add_argument('--no-load', action='store_true', help='only read config.json; do not build the model')
    parser.commands = sub.choices
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = (parser := build_parser()).parse_args(argv)
    command = args.command or 'info'
    cmd_parser = parser.commands[command]
    for name in GLOBAL_OPTIONS:
        given = getattr(args, name, None)
        if name not in cmd_parser.global_options and given not in (None, False):
            cmd_parser.error(f"--{name.replace('_', '-')} does not apply to {command}")
        if given is None:
            setattr(args, name, cmd_parser.global_defaults.get(name))
    try:
        return cmd_parser.handler(args, cmd_parser)
    except Exception as e:  # one line, never a traceback; the type named where the message may not say what failed
        known = isinstance(e, (hub.PretrainedWeightsError, ValueError, OSError))
        return fail(command, e if known else f'{type(e).__name__}: {e}')
