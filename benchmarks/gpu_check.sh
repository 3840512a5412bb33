#!/usr/bin/env bash
# The GPU check of issue 12 in one call: CUDA tests, then benchmarks/gpu.py (SDPA calls, layer vs timm's HaloAttn,
# halonet_h1 vs timm's halonet_h1 and resnet50, targets). Under 8 minutes on one H100, no network needed.
#
#   bash benchmarks/gpu_check.sh --prepare      # here, once: copy this machine's timm into .wheels/ (git-ignored)
#   bash benchmarks/gpu_check.sh                # on the GPU machine (device tool: carry [".wheels"])
#   bash benchmarks/gpu_check.sh --device cpu --quick    # dry run without a GPU (arguments go to benchmarks/gpu.py)
#
# Writes gpu.md, gpu.json, tests.log and bench.log to $OUT if set, else to benchmarks/out/gpu/.
# Environment: GPU_CHECK_BUDGET (seconds for the whole script, default 470), GPU_CHECK_TESTS=0 (skip pytest),
# PYTHON (default python3).
#
# timm >= 1.0.31 is needed. The GPU machine's own timm is used when new enough; else the copy carried in
# .wheels/site (from --prepare), and any wheels in .wheels/*.whl are installed into a private folder with
# pip --no-index --no-deps (torch is never touched). timm_halo itself runs from this checkout via PYTHONPATH
# (an editable install needs the hatchling build backend, which an offline machine may not have).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
WHEELS=.wheels
MIN_TIMM=1.0.31

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

start=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-470}
OUT_DIR=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT_DIR" || exit 1

timm_ok() {
    "$PY" - "$MIN_TIMM" <<'EOF' 2>/dev/null
import sys
import timm
def version(s):
    return tuple(int(p) for p in s.split('+')[0].split('.')[:3] if p.isdigit())
sys.exit(0 if version(timm.__version__) >= version(sys.argv[1]) else 1)
EOF
}

if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! timm_ok && [ -d "$WHEELS/site/timm" ]; then
    export PYTHONPATH=$PWD/$WHEELS/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! timm_ok; then
    echo "timm >= $MIN_TIMM is missing: run 'bash benchmarks/gpu_check.sh --prepare' where it is installed and" \
        "carry $WHEELS" >&2
    exit 3
fi
if ! "$PY" -c 'import einops' 2>/dev/null && [ -d "$WHEELS/site/einops" ]; then
    export PYTHONPATH=$PWD/$WHEELS/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c 'import torch, timm, timm_halo; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
"| timm", timm.__version__, timm.__file__, "| timm_halo", timm_halo.__file__)' || exit 1

test_rc=skipped
if [ "${GPU_CHECK_TESTS:-1}" != 0 ]; then
    timeout 240 "$PY" -m pytest -q -p no:cacheprovider -rfEs tests/test_cuda.py tests/test_sdpa.py \
        >"$OUT_DIR/tests.log" 2>&1
    test_rc=$?
    tail -n 25 "$OUT_DIR/tests.log"
fi

left=$((BUDGET - ($(date +%s) - start)))
[ "$left" -ge 60 ] || left=60
timeout $((left + 30)) "$PY" -m benchmarks.gpu --budget "$left" --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/bench.log" \
    | grep -E '^(budget|wrote|Traceback|[A-Za-z]*Error)'
bench_rc=${PIPESTATUS[0]}

echo
[ -f "$OUT_DIR/gpu.md" ] && cat "$OUT_DIR/gpu.md"
echo
echo "tests: $(tail -n 1 "$OUT_DIR/tests.log" 2>/dev/null) (exit $test_rc)"
echo "benchmark exit $bench_rc; $(($(date +%s) - start)) s in all; files in $OUT_DIR"
[ "$test_rc" = 0 ] || [ "$test_rc" = skipped ] || exit 1
exit "$bench_rc"
