#!/usr/bin/env bash
# The whole GPU pass in ONE command (about 9 minutes on an H100):
#
#   bash bench/gpu_check.sh [STEP ...]      STEP in: wheels install info warmup tests ops model
#                                           (default: all, in order)
#
# Steps, each time-boxed (seconds, env overrides) and each allowed to fail without
# stopping the rest:
#   wheels   when a .whl/ folder is in the repo root: install those wheels into /tmp/site
#            (packages the GPU image lacks, e.g. monai, nibabel, nilearn) and put it on PYTHONPATH
#   install  pip install --no-deps --no-build-isolation -e .      (T_INSTALL, 200: may build the
#            CUDA extension, with MAX_JOBS=nproc)
#   info     python -m ahnet_fast.info                             (T_INFO, 30)
#   warmup   ahnet-fast warmup (bf16 and fp32, forward + training step) compiles every Triton
#            kernel variant the tests and the model benchmark launch, into Triton's on-disk
#            cache                                                 (T_WARMUP, 60 each) -> warmup.log
#   tests    the GPU-marked tests (pytest -m gpu)                  (T_TESTS, 100) -> tests.log
#            (4 xdist workers when pytest-xdist is there: TEST_WORKERS)
#   ops      python -m bench.ops                                   (share of what is left)
#   model    python -m bench.model                                 (the rest, until T_TOTAL)
# T_TOTAL (default 530) caps the whole run; ops gets T_OPS/(T_OPS+T_MODEL) of the time
# left after tests (defaults 130/110), model the rest. The suites stop starting new work
# when their budget is spent and record the rest as skipped; their JSON/markdown is
# rewritten after every case, so even a killed step leaves its results.
#
# Output, flat (the device tool returns at most 8 files): ${OUT:-bench/results/latest}/
#   steps.log warmup.log tests.log ops.json ops.md roofline.png model.json model.md
# Extra arguments for the suites: OPS_ARGS / MODEL_ARGS (e.g. MODEL_ARGS="--no-compile").
# The commit is recorded from git, or from AHNET_FAST_GIT_COMMIT when the copy has no .git.
set -u
cd "$(dirname "$0")/.."
RES="${OUT:-bench/results/latest}"
mkdir -p "$RES"
LOG="$RES/steps.log"
: >"$LOG"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}"
T_TOTAL="${T_TOTAL:-530}"
T_INSTALL="${T_INSTALL:-200}"
T_INFO="${T_INFO:-30}"
T_TESTS="${T_TESTS:-100}"
T_WARMUP="${T_WARMUP:-60}"
T_OPS="${T_OPS:-130}"
T_MODEL="${T_MODEL:-110}"
STEPS="${*:-wheels install info warmup tests ops model}"
START=$(date +%s)
if [ -z "${AHNET_FAST_GIT_COMMIT:-}" ]; then
    AHNET_FAST_GIT_COMMIT="$(git rev-parse HEAD 2>/dev/null || true)"
fi
export AHNET_FAST_GIT_COMMIT
SUMMARY=()

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( T_TOTAL - $(elapsed) )); }
want() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# run_step NAME LIMIT_S LOGFILE CMD...: time-boxed, output appended to LOGFILE, status recorded
run_step() {
    local name=$1 limit=$2 logfile=$3
    shift 3
    if [ "$limit" -lt 5 ]; then
        SUMMARY+=("$name: SKIPPED (no time left)")
        echo "=== $name skipped: no time left" >>"$LOG"
        return
    fi
    local t0 rc
    t0=$(date +%s)
    echo "=== $name (limit ${limit}s, at +$(elapsed)s): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" >>"$logfile" 2>&1
    rc=$?
    local dt=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then
        SUMMARY+=("$name: ok (${dt}s)")
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        SUMMARY+=("$name: TIMED OUT after ${dt}s (limit ${limit}s)")
    else
        SUMMARY+=("$name: FAILED rc=$rc (${dt}s)")
    fi
    echo "=== $name: rc=$rc after ${dt}s" | tee -a "$LOG"
}

if want wheels && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    echo "=== wheels: $(ls .whl | tr '\n' ' ')" | tee -a "$LOG"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl >>"$LOG" 2>&1; then
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
        SUMMARY+=("wheels: ok")
    else
        SUMMARY+=("wheels: FAILED (see steps.log)")
    fi
fi

{
    echo "=== machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu \
        --format=csv 2>&1 || echo "nvidia-smi not available"
    "$PY" - <<'PYEOF' 2>&1
import importlib.metadata as md, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(),
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("triton", "monai", "nibabel", "nilearn", "pytest", "pytest-timeout"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "NOT INSTALLED")
PYEOF
    echo "commit ${AHNET_FAST_GIT_COMMIT:-unknown}"
} >>"$LOG" 2>&1

if want install; then
    run_step install "$(( T_INSTALL < $(left) ? T_INSTALL : $(left) ))" "$LOG" \
        "$PY" -m pip install --no-deps --no-build-isolation -e .
fi
if want info; then
    run_step info "$(( T_INFO < $(left) ? T_INFO : $(left) ))" "$LOG" "$PY" -m ahnet_fast.info
fi
if want warmup; then
    # compile first, once, what the tests and the model benchmark launch (Triton's on-disk cache
    # keeps it for every later step): bf16 and fp32, forward and training step, the benchmark's
    # AH-Net configuration. A cold cache otherwise spends the test step's budget compiling.
    : >"$RES/warmup.log"
    for dt in bf16 fp32; do
        run_step "warmup-$dt" "$(( T_WARMUP < $(left) ? T_WARMUP : $(left) ))" "$RES/warmup.log" \
            "$PY" -m ahnet_fast.cli warmup --psp 3 --upsample trilinear --out-channels 4 --dtype "$dt" \
            --channels-last --train
    done
    tail -n 6 "$RES/warmup.log" >>"$LOG"
fi
if want tests; then
    # -v: one line per test as it finishes, so a time-boxed kill still leaves what ran;
    # xdist (on the GPU image) spreads the suite over 4 workers sharing the GPU.
    # The GPU-marked tests first (what only this machine can check), then the rest if time is left.
    PYTEST_ARGS=(-v -ra --durations=15 -p no:cacheprovider)
    if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then PYTEST_ARGS+=(--timeout=120); fi
    if "$PY" -c "import xdist" >/dev/null 2>&1; then PYTEST_ARGS+=(-n "${TEST_WORKERS:-4}" --dist loadfile); fi
    : >"$RES/tests.log"
    run_step tests-gpu "$(( T_TESTS < $(left) ? T_TESTS : $(left) ))" "$RES/tests.log" \
        "$PY" -m pytest tests -m gpu "${PYTEST_ARGS[@]}"
    tail -n 25 "$RES/tests.log" >>"$LOG"
fi
if want ops; then
    if want model; then
        L=$(( $(left) * T_OPS / (T_OPS + T_MODEL) ))
    else
        L=$(left)
    fi
    # the suite's own budget ends 25 s before the hard limit so it writes its files and exits
    run_step ops "$L" "$LOG" "$PY" -m bench.ops --out "$RES" --budget-s $(( L > 40 ? L - 25 : 15 )) ${OPS_ARGS:-}
fi
if want model; then
    L=$(left)
    run_step model "$L" "$LOG" "$PY" -m bench.model --out "$RES" --budget-s $(( L > 40 ? L - 25 : 15 )) ${MODEL_ARGS:-}
fi

echo
echo "================ gpu_check summary (+$(elapsed)s) ================"
for s in "${SUMMARY[@]}"; do echo "  $s"; done | tee -a "$LOG"
for md in ops.md model.md; do
    if [ -f "$RES/$md" ]; then
        echo
        # the 'ours against' table and the environment lines: what a person reads first
        sed -n '1,/^## Every contender/p' "$RES/$md" | head -n 80
    fi
done
if [ -f "$RES/tests.log" ]; then
    echo
    echo "--- tests (tail)"
    tail -n 15 "$RES/tests.log"
fi
echo
echo "files: $(ls "$RES" | tr '\n' ' ')"
