#!/usr/bin/env bash
# The GPU check: on a CUDA machine, the test suite natively (in parallel with pytest-xdist when it is
# installed), then `fastcyclic bench all --device cuda`, everything into one archive:
#   OUT_DIR/gpu_check.tgz  (tar xzf it) holding
#     machine.txt  check.log  tests.log  bench.log  cubins.txt (registers and spills of every compiled kernel)
#     portable-tests.log  bench/all.json  bench/{ce,optim,train,geometry}/NAME.{json,csv,png}
#   OUT_DIR/check.log      the stage log, also printed
# Usage: bench/gpu_check.sh [OUT_DIR]     (default: $OUT, else ./bench-out)
# The files are written to a temporary folder and packed into OUT_DIR after every stage: the device tool
# brings back at most 8 files from $OUT, none deeper than $OUT/a/b/, so a run stopped at its time limit
# still returns the stages it finished.
#
# Sized to end within 6 minutes on an H200.  A 15-minute GPU session has room for one full run and one
# cut-down call, not two full runs: the machine goes back 30 s after a call, and each fresh start costs
# a minute or more of the session's time (e.g. a second call STAGES=bench BENCH_SUITES=ce TOTAL_BUDGET=200).
# Each stage has its own time limit (TEST_TIMEOUT, BENCH_TIMEOUT seconds; the bench's default is what
# TOTAL_BUDGET leaves after the tests, at most 170), so one stage hanging leaves the others' results,
# and the benchmark stops starting new cases after BENCH_BUDGET seconds (default: its limit less 35)
# (they are recorded as "skipped"), so it normally ends on its own with complete files; every
# suite also rewrites its JSON and CSV atomically after each case (its PNG is drawn once, at the
# end).  The suites run in the order of BENCH_SUITES (default: train geometry optim ce: the ones
# never measured on a GPU first).
# BENCH_ARGS adds arguments to `bench all` (e.g. "--quick"); TEST_ARGS to the first pytest run (split on
# spaces: a -k expression without spaces, e.g. TEST_ARGS="-k cuda_graph").
#
# The tests come in two runs.  "tests", first: every test that runs GPU code (kernels, optimizers,
# trainer, data, geometry, and every `cuda`-marked test; those GPU-only ones start first, then the trainer's,
# the optimizers' and the kernels', see tests/conftest.py, so a run stopped by its time limit (about 1000 tests,
# likely more than 170 s) has them).  "portable-tests", last, in what is left of
# TOTAL_BUDGET seconds (default 360): the tests marked `portable` (CLIs, harness and sweep bookkeeping,
# sm_90 compiles), whose code runs alike on any machine and which CPU CI runs in full.
#
# STAGES picks what runs (default "tests bench cubins portable-tests"). The optional stage "sweep" (not in
# the 6 minutes; about 2.5 more) measures issue 7's GPU sweep throughput: the same small grid with 1 and
# with 4 worker processes sharing the GPU, each limited to SWEEP_TIMEOUT seconds; sweep-w1.log and
# sweep-w4.log end with runs per hour. A second call can then run e.g. STAGES="sweep" or STAGES="bench"
# BENCH_SUITES="ce".
set -uo pipefail
dest=${1:-${OUT:-bench-out}}
mkdir -p "$dest" && dest=$(cd "$dest" && pwd)  # absolute: the script works from the repository root
cd "$(dirname "$0")/.."
out=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # the results' tree, packed into $dest by pack
export PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}  # read at cuBLAS's start (deterministic runs)
started=$(date +%s)
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$out/check.log"; }
# pack: everything so far into $dest/gpu_check.tgz (renamed into place: never half an archive) and check.log
pack() {
    tar -czf "$dest/gpu_check.tgz.part" -C "$out" . && mv -f "$dest/gpu_check.tgz.part" "$dest/gpu_check.tgz"
    cp -f "$out/check.log" "$dest/check.log"
}

log "machine"
{
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv
    python3 -c "import sys, setuptools, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
                'triton', triton.__version__, 'cuda', torch.version.cuda, 'setuptools', setuptools.__version__)"
    git log -1 --format='commit %H %s' 2>/dev/null
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt" | tee -a "$out/check.log"

# The machine has no network: install in place without build isolation (for the `fastcyclic` command; it needs
# setuptools >= 77 there). Without it everything here still runs: `python3 -m` in the repository root imports
# the checkout, which finds its kernels/ and bench/ (fastcyclic/__init__.py)
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$out/check.log" 2>&1; then
    log "pip install failed (see above); running from the checkout"
fi

stages=" ${STAGES:-tests bench cubins portable-tests} "
for stage in $stages; do
    case $stage in tests|bench|sweep|cubins|portable-tests) ;;
        *) log "unknown stage '$stage' in STAGES (tests bench sweep cubins portable-tests)"; pack; exit 2;;
    esac
done

# limited LIMIT COMMAND...: COMMAND with a time limit (TERM, then KILL 10 s later), then KILL to whatever it left
# running in its process group: pytest-xdist workers outlive a stopped controller (a test may turn SIGTERM into
# KeyboardInterrupt and go on), and would hold GPU memory into the next stage. Returns COMMAND's exit code
# (124 or 137 at the limit). timeout makes its own process group, whose id is its pid.
limited() {
    local limit=$1
    shift
    timeout -k 10 "$limit" "$@" &
    local pid=$!
    wait "$pid"
    local code=$?
    kill -KILL -- "-$pid" 2> /dev/null
    return $code
}

parallel=()
if python3 -c "import xdist" > /dev/null 2>&1; then
    parallel=(-n "${WORKERS:-8}" --dist loadgroup)
else
    log "pytest-xdist not installed: the tests run in one process"
fi
# run_tests NAME LIMIT PYTEST_ARGS...: one pytest run into NAME.log
run_tests() {
    local name=$1 limit=$2
    shift 2
    log "$name (limit ${limit}s, ${parallel[*]:-serial}): $*"
    # -v: one line per finished test, so a run stopped by the time limit still shows what passed and failed
    limited "$limit" python3 -m pytest tests -v -rfEs -p no:cacheprovider "${parallel[@]}" --durations=15 \
        "$@" > "$out/$name.log" 2>&1
    local code=$?
    log "$name exit code $code$([ $code -ge 124 ] && echo ' (time limit)'): $(tail -n 1 "$out/$name.log")"
    pack
}

if [[ $stages == *" tests "* ]]; then
    # shellcheck disable=SC2086  # TEST_ARGS is a list of words
    run_tests tests "${TEST_TIMEOUT:-170}" -m "not benchmark and (cuda or not portable)" ${TEST_ARGS:-}
fi

if [[ $stages == *" bench "* ]]; then
    # at most 170 s, and what TOTAL_BUDGET leaves after the tests less 50 s for the cubins stage (>= 60 s)
    left=$(( ${TOTAL_BUDGET:-360} - ($(date +%s) - started) - 50 ))
    bench_limit=${BENCH_TIMEOUT:-$(( left > 170 ? 170 : left < 60 ? 60 : left ))}
    bench_budget=${BENCH_BUDGET:-$(( bench_limit > 70 ? bench_limit - 35 : bench_limit / 2 ))}
    log "bench all (limit ${bench_limit}s, new cases until ${bench_budget}s)"
    # shellcheck disable=SC2086
    limited "$bench_limit" python3 -m fastcyclic.cli bench all --device cuda \
        --suites ${BENCH_SUITES:-train geometry optim ce} --budget-s "$bench_budget" --out "$out/bench" \
        ${BENCH_ARGS:-} > "$out/bench.log" 2>&1
    code=$?
    log "bench exit code $code$([ $code -ge 124 ] && echo ' (time limit)')$([ $code -eq 3 ] && echo ' (incomplete: the budget skipped cases of ours)')"
    cat "$out/bench.log"
    pack
fi

if [[ $stages == *" sweep "* ]]; then
    sweep_limit=${SWEEP_TIMEOUT:-75}
    for workers in 1 4; do
        log "sweep throughput with $workers worker process(es) (limit ${sweep_limit}s)"
        # a fresh directory (a rerun would resume and measure nothing); the sweep stops starting runs 25 s before
        # the limit, so it ends on its own and prints its runs per hour
        rm -rf "$out/sweep-w$workers"
        limited "$sweep_limit" python3 -m fastcyclic.cli sweep --p 127,1543 --weight-decay 1e-4,1e-2 \
            --seeds 2 --steps 300 --set batch_size=2048 --device "${SWEEP_DEVICE:-cuda}" --workers "$workers" \
            --max-minutes "$(python3 -c "print(max(0.1, ($sweep_limit - 25) / 60))")" \
            --no-figures --out "$out/sweep-w$workers" > "$out/sweep-w$workers.log" 2>&1
        code=$?  # 1 is expected: the runs left at --max-minutes count as unfinished
        log "sweep exit code $code$([ $code -ge 124 ] && echo ' (time limit)'): $(grep 'runs in' "$out/sweep-w$workers.log")"
        pack
    done
fi

if [[ $stages == *" cubins "* ]]; then
    log "compiled kernels: registers and spills (cuobjdump on triton's cache)"
    limited "${CUBINS_TIMEOUT:-40}" python3 -m fastcyclic.bench.sm90 --cache > "$out/cubins.txt" 2>&1
    code=$?
    log "cubins exit code $code$([ $code -ge 124 ] && echo ' (time limit)'): $(grep -c ' shared ' "$out/cubins.txt") kernels"
    pack
fi
if [[ $stages == *" portable-tests "* ]]; then
    left=$(( ${TOTAL_BUDGET:-360} - ($(date +%s) - started) ))
    if (( left >= 30 )); then
        run_tests portable-tests "$left" -m "portable and not cuda and not benchmark"
    else
        log "portable-tests skipped: ${left}s left of TOTAL_BUDGET=${TOTAL_BUDGET:-360}s (CPU CI runs them)"
    fi
fi
log "done in $(( $(date +%s) - started )) s; results in $dest/gpu_check.tgz (tar xzf it)"
pack
