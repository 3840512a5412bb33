"""`timm-halo` command line: a thin layer over timm's own APIs."""
import argparse
import sys
import time
from typing import List, Optional

import timm
import torch
from huggingface_hub.utils import tqdm

import timm_halo
from timm_halo.bench import add_cli_commands as add_bench_commands
from timm_halo.export import add_cli_commands as add_export_commands
from timm_halo.hub import add_cli_commands as add_hub_commands
from timm_halo.summary import family, summarize


def _print_family(stream) -> None:
    rows = []
    for name in tqdm(family(), desc='measuring the family', unit='model', file=sys.stderr):
        rows.append(summarize(name))
    print('HaloNet family: params measured here vs the paper; GMACs of one image at the input size', file=stream)
    print(f'{"model":<12}{"input":>6}{"params":>9}{"paper":>8}{"diff":>8}{"GMACs":>8}{"top-1*":>8}', file=stream)
    for r in rows:
        print(
            f'{r.name:<12}{r.img_size:>6}{r.params_m:>8.2f}M{r.paper_params_m:>7.1f}M{r.params_diff_pct:>+7.2f}%'
            f'{r.gmacs:>8.2f}{r.paper_top1:>8.1f}', file=stream)
    print('* ImageNet top-1 reported in the paper; no weights ship with this package yet.\n', file=stream)


def _run_forward(model_name: str, img_size: Optional[int], batch_size: int, stream) -> None:
    torch.manual_seed(0)
    model = timm.create_model(model_name).eval()
    size = img_size or model.pretrained_cfg['input_size'][-1]
    x = torch.randn(batch_size, 3, size, size)
    with torch.no_grad():
        start = time.perf_counter()
        logits = model(x)
        elapsed = time.perf_counter() - start
    print(f'timm.create_model({model_name!r}) -> {type(model).__module__}.{type(model).__name__}', file=stream)
    print(f'  forward {tuple(x.shape)} -> logits {tuple(logits.shape)} in {elapsed:.2f}s', file=stream)

    features = timm.create_model(model_name, features_only=True).eval()
    with torch.no_grad():
        maps = features(x)
    print('  features_only pyramid:', file=stream)
    for info, fmap in zip(features.feature_info.get_dicts(), maps):
        print(f'    {info["module"]:<12} reduction {info["reduction"]:>2}  {tuple(fmap.shape)}', file=stream)

    # The fast path the model just ran, held against the dense reference on its first attention layer.
    attn = model.stages[0].blocks[0].attn
    probe = torch.randn(1, attn.dim, 13, 11)
    with torch.no_grad():
        diff = (attn(probe) - attn.reference_forward(probe)).abs().max().item()
    print(f'  HaloAttention fast path vs dense reference (13x11 map, masked borders): max |diff| {diff:.1e}',
          file=stream)


def cmd_info(args: argparse.Namespace) -> int:
    out = sys.stdout
    print(f'timm-halo {timm_halo.__version__} | timm {timm.__version__} | torch {torch.__version__} | '
          f'{torch.get_num_threads()} CPU threads\n', file=out)
    if not args.skip_family:
        _print_family(out)
    _run_forward(args.model, args.img_size, args.batch_size, out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-halo', description='HaloNet backbones for timm: family overview and a real forward pass.')
    sub = parser.add_subparsers(dest='command')
    info = sub.add_parser('info', help='show the H0-H7 family and run a forward pass (the default command)')
    for p in (parser, info):
        p.add_argument('--model', default='halonet_h0', help='model for the forward pass (default: halonet_h0)')
        p.add_argument('--img-size', type=int, default=None, help='input size (default: the model\'s own)')
        p.add_argument('--batch-size', type=int, default=1)
        p.add_argument('--skip-family', action='store_true', help='skip the family table')
    add_hub_commands(sub)  # hub-export, hub-inspect (timm_halo/hub.py)
    add_bench_commands(sub)  # bench (timm_halo/bench.py)
    add_export_commands(sub)  # export (timm_halo/export.py)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, 'handler', None) is not None:  # subcommands that bring their own handler
        return args.handler(args, parser)
    if args.model not in timm.list_models('halonet_*'):
        parser.error(f'unknown model {args.model!r}; choose from {", ".join(timm.list_models("halonet_*"))}')
    if args.batch_size < 1 or (args.img_size is not None and args.img_size < 32):
        parser.error('--batch-size must be >= 1 and --img-size >= 32')
    return cmd_info(args)


if __name__ == '__main__':
    sys.exit(main())
