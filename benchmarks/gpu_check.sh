#!/usr/bin/env bash
# The GPU check in one call: CUDA tests, then the sections of benchmarks/gpu.py (layer vs timm's
# HaloAttn, SDPA calls, halonet_h1 vs timm's halonet_h1 and resnet50 eager and compiled), each in its own process
# under its own time limit, so an error, a crash or a hang costs that section only. Stops by itself within
# GPU_CHECK_BUDGET + 5 seconds (default 525: under 9 minutes, all included); no network needed.
#
#   bash benchmarks/gpu_check.sh --prepare      # here, once: copy this machine's timm into .wheels/ (git-ignored)
#   bash benchmarks/gpu_check.sh                # on the GPU machine (device tool: carry [".wheels"])
#   bash benchmarks/gpu_check.sh --device cpu --quick    # dry run without a GPU (arguments go to benchmarks/gpu.py)
#
# Sections, in order: tests (pytest tests/test_cuda.py tests/test_sdpa.py; on CPU test_cuda.py only, all skipped),
# layer, sdpa, models_eager, models_compiled. Each writes <section>.md, .json and .log to $OUT if set, else to
# benchmarks/out/gpu/, as soon as it ends; a failure or timeout is recorded there with its error, and the next
# section runs. gpu.md and gpu.json gather them with the targets. Exit 0 if every section that ran is ok, else 1.
# Environment: GPU_CHECK_BUDGET (seconds, all included), GPU_CHECK_SECTIONS (comma-separated subset),
# GPU_CHECK_LIMITS ("tests=60,layer=120": seconds per section; models_compiled gets what is left),
# GPU_CHECK_FAIL (<section>[:error|crash|hang],...: fail on purpose, to check the rest goes on), PYTHON (python3).
#
# timm >= 1.0.31 is needed. The GPU machine's own timm is used when new enough; else the copy carried in
# .wheels/site (from --prepare), and any wheels in .wheels/*.whl are installed into a private folder with
# pip --no-index --no-deps (torch is never touched). timm_halo itself runs from this checkout via PYTHONPATH
# (an editable install needs the hatchling build backend, which an offline machine may not have).
set -uo pipefail
start=$(date +%s)
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
WHEELS=.wheels
MIN_TIMM=1.0.31
ALL_SECTIONS=(tests layer sdpa models_eager models_compiled)

if [ "${1:-}" = "--prepare" ]; then
    rm -rf "$WHEELS/site" && mkdir -p "$WHEELS/site" || exit 1
    for pkg in timm einops; do
        src=$("$PY" -c "import os, $pkg; print(os.path.dirname($pkg.__file__))") || exit 1
        cp -r "$src" "$WHEELS/site/$pkg" || exit 1
    done
    find "$WHEELS/site" -name __pycache__ -prune -exec rm -rf {} +
    "$PY" -c "import sys; sys.path.insert(0, '$WHEELS/site'); import timm; print('carried timm', timm.__version__)"
    du -sh "$WHEELS"
    echo "now: device run with carry [\"$WHEELS\"] and command 'bash benchmarks/gpu_check.sh'"
    exit 0
fi

BUDGET=${GPU_CHECK_BUDGET:-525}
RESERVE=20  # seconds kept for the summary at the end
OUT_DIR=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT_DIR" || exit 1
declare -A LIMIT=([tests]=120 [layer]=90 [sdpa]=45 [models_eager]=90 [models_compiled]=0)
IFS=, read -ra items <<<"${GPU_CHECK_LIMITS:-}"
for item in "${items[@]}"; do LIMIT[${item%%=*}]=${item#*=}; done
IFS=, read -ra SECTIONS <<<"${GPU_CHECK_SECTIONS:-$(IFS=,; echo "${ALL_SECTIONS[*]}")}"
for name in "${SECTIONS[@]}" "${!LIMIT[@]}"; do
    case " ${ALL_SECTIONS[*]} " in *" $name "*) ;; *) echo "unknown section '$name'; known: ${ALL_SECTIONS[*]}" >&2
        exit 2 ;; esac
done
DEVICE=cuda
prev=
for arg in "$@"; do
    [ "$prev" = --device ] && DEVICE=$arg
    case $arg in --device=*) DEVICE=${arg#--device=} ;; esac
    prev=$arg
done

# Reads timm's version.py without importing timm (an import costs seconds); exit 0 when new enough.
timm_ok() {
    "$PY" - "$MIN_TIMM" <<'EOF' 2>/dev/null
import importlib.util, os, re, sys
spec = importlib.util.find_spec('timm')
text = open(os.path.join(os.path.dirname(spec.origin), 'version.py')).read()
found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text).group(1)
def version(s):
    return tuple(int(p) for p in s.split('+')[0].split('.')[:3] if p.isdigit())
print(found, os.path.dirname(spec.origin))
sys.exit(0 if version(found) >= version(sys.argv[1]) else 1)
EOF
}

if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site "$WHEELS"/*.whl || echo "warning: installing $WHEELS/*.whl failed" >&2
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! timm_ok >/dev/null && [ -d "$WHEELS/site/timm" ]; then
    export PYTHONPATH=$PWD/$WHEELS/site${PYTHONPATH:+:$PYTHONPATH}
fi
timm_found=$(timm_ok) || echo "warning: timm >= $MIN_TIMM is missing (found: ${timm_found:-none}); run" \
    "'bash benchmarks/gpu_check.sh --prepare' where it is installed and carry $WHEELS. Going on: the sections" \
    "record what fails." >&2
if ! "$PY" -c 'import einops' 2>/dev/null && [ -d "$WHEELS/site/einops" ]; then
    export PYTHONPATH=$PWD/$WHEELS/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader
"$PY" -c 'import importlib.metadata as m, platform; print("python", platform.python_version(), "| torch",
m.version("torch"), end=" ")' 2>/dev/null
echo "| timm ${timm_found:-missing} | device $DEVICE | budget $BUDGET s | out $OUT_DIR"

# Records a section's end in its .md/.json (stdlib only: it must work when torch or the section is broken):
# a timeout, a signal or an exit without the section's own record becomes 'failed' with the log's last lines,
# rows already written are kept; the tests section's files are made here from pytest's log.
finish() {  # name rc limit seconds [skip reason]
    "$PY" - "$@" "$OUT_DIR" <<'EOF'
import json, os, re, signal, sys
name, rc, limit, seconds, note, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), \
    sys.argv[5], sys.argv[6]
base = os.path.join(out, name)
try:
    with open(base + '.log', errors='replace') as f:
        log = f.read().splitlines()
except OSError:
    log = []
data, md = dict(section=name, title=name, status='running', error=None, rows=[]), None
try:
    with open(base + '.json') as f:
        data.update(json.load(f))
    with open(base + '.md') as f:
        md = f.read()
except (OSError, ValueError):
    pass
if name == 'tests' and not note:
    outcome = re.compile(r'(\S+::.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b')
    data['rows'] = [dict(test=m[1], outcome=m[2]) for m in map(outcome.match, log) if m]
    counts = {}
    for r in data['rows']:
        counts[r['outcome']] = counts.get(r['outcome'], 0) + 1
    data['summary'] = next((s.strip('= ') for s in reversed(log) if re.search(r' in [\d.]+s', s)), '')
    at = next((i for i, s in enumerate(log) if 'short test summary info' in s), len(log))
    short = '\n'.join(log[at + 1:])
    table = '| outcome | tests |\n|---|---|\n' + ''.join(f'| {k} | {v} |\n' for k, v in counts.items())
    md = f'## {data["title"]}\n\nstatus: running\n\n{table if counts else "(no results)"}\n' + (
        f'\n```text\n{short}\n```\n' if short else '')
if note:
    data['status'], data['error'] = 'skipped', note
elif rc == 0:
    data['status'] = 'ok' if data['status'] == 'running' else data['status']
elif rc in (124, 137) and seconds >= limit - 1:
    data['status'], data['error'] = 'failed', f'timed out after {limit} s, the time limit of the section'
elif rc > 128 and rc - 128 in {s.value for s in signal.Signals}:
    data['status'], data['error'] = 'failed', f'killed by {signal.Signals(rc - 128).name}'
elif data['status'] != 'failed':
    last = next((s.strip() for s in reversed(log) if s.strip()), '')
    error = data.get('summary') or f'exit status {rc}' + (f': {last}' if last else '')
    data['status'], data['error'] = 'failed', error
if md is None or data['status'] != 'failed' or data.get('traceback') is None:  # else the section wrote it all
    line = f'FAILED after {seconds:.0f} s: {data["error"]}' if data['status'] == 'failed' else \
        f'{data["status"]} ({seconds:.0f} s, {len(data["rows"])} rows){": " + note if note else ""}'
    md = md or f'## {name}\n\nstatus: running\n\n(no rows)\n'
    md = re.sub(r'^status: .*$', lambda m: 'status: ' + line, md, count=1, flags=re.M)
    if data['status'] == 'failed' and log:
        md += '\nlast lines of {}.log:\n\n```text\n{}\n```\n'.format(name, '\n'.join(log[-15:]))
data['wall_s'] = round(seconds, 1)  # the process's, imports included
with open(base + '.json', 'w') as f:
    json.dump(data, f, indent=1)
with open(base + '.md', 'w') as f:
    f.write(md)
print(f'{name}: {data["status"]} ({seconds:.0f} s, {len(data["rows"])} rows)'
      + (f': {data["error"]}' if data['error'] else ''))
EOF
}

fails_on_purpose() {  # prints the mode GPU_CHECK_FAIL asks for a section, if any
    local item items
    IFS=, read -ra items <<<"${GPU_CHECK_FAIL:-}"
    for item in "${items[@]}"; do
        [ "${item%%:*}" = "$1" ] && { [ "$item" = "$1" ] && echo error || echo "${item#*:}"; }
    done
}

rm -f "$OUT_DIR"/{gpu,summary,tests,layer,sdpa,models_eager,models_compiled}.{md,json,log}
STATUS=()
failed=0
for name in "${SECTIONS[@]}"; do
    left=$((start + BUDGET - RESERVE - $(date +%s)))
    limit=${LIMIT[$name]}
    [ "$limit" -gt 0 ] && [ "$limit" -le "$left" ] || limit=$left
    if [ "$left" -lt 20 ]; then
        line=$(finish "$name" 0 0 0 "not run: ${left} s left of GPU_CHECK_BUDGET=$BUDGET")
        STATUS+=("$line"); echo "$line"
        continue
    fi
    if [ "$name" = tests ]; then
        files=(tests/test_cuda.py tests/test_sdpa.py)
        [ "$DEVICE" = cuda ] || files=(tests/test_cuda.py)  # test_sdpa.py is in the CPU suite anyway
        printf '{"section": "tests", "title": "CUDA tests: pytest %s", "status": "running", "rows": []}' \
            "${files[*]}" >"$OUT_DIR/tests.json"
        # one process (one GPU), no addopts (pytest-xdist may be missing); -v logs each result as it comes
        cmd=("$PY" -m pytest -o addopts= -p no:cacheprovider -v --tb=short -rfEs --durations=5 "${files[@]}")
        case $(fails_on_purpose tests) in
            error) cmd=("$PY" -c 'raise SystemExit("forced failure of section tests (GPU_CHECK_FAIL)")') ;;
            crash) cmd=(bash -c 'ulimit -c 0; kill -SEGV $$') ;;
            hang) cmd=(sleep 100000) ;;
        esac
    else
        # the section's own budget ends before its limit: it skips what would not fit, and says so
        cmd=("$PY" -m benchmarks.gpu --section "$name" --budget $((limit > 30 ? limit - 15 : limit / 2)) \
            --out "$OUT_DIR" "$@")
    fi
    echo "== $name (limit $limit s)"
    t0=$(date +%s)
    timeout -k 5 "$limit" "${cmd[@]}" >"$OUT_DIR/$name.log" 2>&1
    rc=$?
    line=$(finish "$name" "$rc" "$limit" "$(($(date +%s) - t0))" "")
    if [ -z "$line" ]; then  # the recorder failed too: a bare record, and the log says the rest
        printf '{"section": "%s", "status": "failed", "error": "exit status %s", "rows": []}' "$name" "$rc" \
            >"$OUT_DIR/$name.json"
        printf '## %s\n\nstatus: FAILED: exit status %s, see %s.log\n' "$name" "$rc" "$name" >"$OUT_DIR/$name.md"
        line="$name: failed: exit status $rc"
    fi
    case $line in "$name: ok"* | "$name: skipped"*) ;; *) failed=1 ;; esac
    STATUS+=("$line"); echo "$line"
done

timeout -k 5 $((RESERVE - 5)) "$PY" -m benchmarks.gpu --summary --out "$OUT_DIR" >"$OUT_DIR/summary.log" 2>&1 || {
    echo "summary failed (see $OUT_DIR/summary.log): gpu.md is the sections' files, one after another"
    for name in "${SECTIONS[@]}"; do cat "$OUT_DIR/$name.md"; echo; done >"$OUT_DIR/gpu.md"
}
echo
cat "$OUT_DIR/gpu.md"
echo
echo "files in $OUT_DIR:"
(cd "$OUT_DIR" && ls -l -- *.md *.json *.log 2>/dev/null | awk '{print "  " $NF " (" $5 " bytes)"}')
echo "sections:"
printf '  %s\n' "${STATUS[@]}"
echo "$(($(date +%s) - start)) s in all"
exit "$failed"
