#!/usr/bin/env bash
# The GPU check: on a CUDA machine, the whole test suite natively (the GPU-only tests included),
# then `fastcyclic bench ce --tune` against eager and torch.compile, everything under one directory:
#   machine.txt  check.log  tests.log  bench.log  ce.json  ce.csv
# Usage: bench/gpu_check.sh [OUT_DIR]     (default: $OUT, else ./bench-out)
# Each stage has its own time limit (TEST_TIMEOUT, BENCH_TIMEOUT seconds) so that one stage hanging
# leaves the others' results; the benchmark rewrites its files after every shape.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench-out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$out/check.log"; }

log "machine"
{
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
                'triton', triton.__version__, 'cuda', torch.version.cuda)"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt" | tee -a "$out/check.log"

# The machine has no network: install in place without build isolation, or fall back to a copy
# with the installed layout (fastcyclic.kernels = kernels/, fastcyclic.bench = bench/).
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$out/check.log" 2>&1; then
    log "pip install failed; using a copy of the source tree"
    site=$(mktemp -d)
    cp -r fastcyclic "$site/fastcyclic" && cp -r kernels "$site/fastcyclic/kernels" && cp -r bench "$site/fastcyclic/bench"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

log "tests (limit ${TEST_TIMEOUT:-220}s)"
timeout "${TEST_TIMEOUT:-220}" python3 -m pytest tests -q -rfEs -p no:cacheprovider -n "${WORKERS:-8}" \
    --dist loadgroup --durations=10 > "$out/tests.log" 2>&1
log "tests exit code $?: $(tail -n 1 "$out/tests.log")"

log "bench ce (limit ${BENCH_TIMEOUT:-300}s)"
# BENCH_ARGS replaces the default arguments (e.g. "--tune --methods fastcyclic eager")
timeout "${BENCH_TIMEOUT:-300}" python3 -m fastcyclic.cli bench ce --device cuda \
    ${BENCH_ARGS:---tune --methods fastcyclic eager torch_lce compile} --out "$out" > "$out/bench.log" 2>&1
log "bench exit code $?"
cat "$out/bench.log"
