"""Interpreter start-up cost of the autoload hook when timm is never imported (docs/benchmarks.md)."""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

_LINE = re.compile(r'import time:\s+(\d+) \|\s+(\d+) \|\s*(\S+)')


def _one_run(disable: bool) -> tuple:
    """(the hook's cumulative import time in us, the start-up's wall time in s) of one ``python -c pass``."""
    env = dict(os.environ, TIMM_HALO_DISABLE_AUTOLOAD='1' if disable else '')  # '' is the hook on
    start = time.perf_counter()
    err = subprocess.run([sys.executable, '-X', 'importtime', '-c', 'pass'], capture_output=True, text=True,
                         env=env, check=True).stderr
    return sum(int(m[2]) for m in _LINE.finditer(err) if m[3] == '_timm_halo_autoload'), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--runs', type=int, default=21)
    args = parser.parse_args()
    rows = {}
    for label, disable in (('hook on', False), ('hook disabled', True)):
        hook_us, wall_s = zip(*(_one_run(disable) for _ in range(args.runs)))
        rows[label] = (statistics.median(hook_us) / 1e3, statistics.median(wall_s) * 1e3)
    if rows['hook on'][0] == 0:
        raise SystemExit('_timm_halo_autoload was not imported at start-up: is timm-halo installed here?')
    lines = [f'| {label} | {hook_ms:.3f} | {wall_ms:.1f} |' for label, (hook_ms, wall_ms) in rows.items()]
    print(f'Start-up with timm never imported | {sys.executable} | medians of {args.runs} runs',
          '| case | _timm_halo_autoload import (ms) | `python -c pass` wall (ms) |\n|---|---|---|', *lines, sep='\n')

if __name__ == '__main__':
    main()
