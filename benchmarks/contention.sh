#!/usr/bin/env bash
# Wall times of the demo and test tiers, alone ("quiet") and beside one CPU-bound process
# ("shared"), with torch's default thread count (one per core: the behaviour before issue
# 21) and with the count harness/threads.py chooses. Run on an otherwise idle machine:
#   benchmarks/contention.sh                    # demo + `pytest -m unit`
#   CONTENTION_TIERS="unit e2e" benchmarks/contention.sh
#   PYTHON=.venv/bin/python benchmarks/contention.sh
# Prints one table row per run; each demo run starts from an empty output folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TIERS=${CONTENTION_TIERS:-unit}
WORK=$(mktemp -d)
HOG=""
cleanup() { [ -n "$HOG" ] && kill "$HOG" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset OMP_NUM_THREADS MKL_NUM_THREADS HARNESS_THREADS
DEFAULT=$("$PYTHON" -c "import torch; print(torch.get_num_threads())")

start_hog() { "$PYTHON" -c "while True: pass" & HOG=$!; sleep 1; }
stop_hog() { kill "$HOG"; wait "$HOG" 2>/dev/null || true; HOG=""; }

timed() {  # timed LABEL CMD...: run CMD, print LABEL and its wall time
    local label=$1; shift
    local t0 t1 rc=0 ms
    t0=$(date +%s%N)
    "$@" >"$WORK/last.log" 2>&1 || rc=$?
    t1=$(date +%s%N)
    ms=$(( (t1 - t0) / 1000000 ))
    printf "%-52s %6d.%d s  (exit %s)\n" "$label" $((ms / 1000)) $((ms % 1000 / 100)) "$rc"
}

run_all() {  # run_all LOAD
    local load=$1
    for threads in default chosen; do
        if [ "$threads" = default ]; then flag=(--threads "$DEFAULT"); env=(OMP_NUM_THREADS="$DEFAULT");
        else flag=(); env=(); fi
        timed "demo, $load, threads $threads${flag[1]:+ (${flag[1]})}" \
            env "${env[@]}" "$PYTHON" -m harness run --output_dir "$WORK/demo-$load-$threads" "${flag[@]}"
        grep -h "threads:" "$WORK/last.log" | head -1 | sed 's/^/    /'
        for tier in $TIERS; do
            timed "pytest -m $tier, $load, threads $threads${flag[1]:+ (${flag[1]})}" \
                env "${env[@]}" "$PYTHON" -m pytest -m "$tier" -q -p no:cacheprovider \
                --stand-ins
            tail -1 "$WORK/last.log" | sed 's/^/    /'
        done
    done
}

echo "torch default threads here: $DEFAULT; CPUs: $(nproc)"
run_all quiet
start_hog
run_all shared
stop_hog
