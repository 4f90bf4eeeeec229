#!/usr/bin/env bash
# The GPU half of the benchmark suite, unattended, in ONE call on a CUDA machine with no package registry:
#   build the extension in place (CUDA kernels for this GPU), print build_info(), run the CUDA tests,
#   run `neural-mechanics bench --device cuda` under a time budget, print a short final table.
#
#   bash bench/gpu_check.sh                # from the repository root (or anywhere: it cds there)
#
# Environment (all optional):
#   OUT                 folder for gpu_check.log (every phase's output), RESULTS.md (updated) and
#                       bench/{results.json,results.md,scaling.png} (default: ./gpu-check-out); five files,
#                       since the device tool brings back at most eight
#   PYTHON              interpreter (default: python3, else python)
#   NMX_TOTAL_BUDGET    seconds for the whole script (default 450 = 7.5 min); phases get what is left
#   NMX_BENCH_ARGS      extra arguments for the bench command (e.g. "--parts moments,tracker")
#   TORCH_CUDA_ARCH_LIST  architectures to build (default: this GPU's only, which builds fastest)
#   NMX_GPU_CHECK_DRY=1 rehearsal on a machine without a GPU: keeps an existing build, runs the bench
#                       on the CPU with --quick; checks the script's plumbing, not the GPU
#
# It never changes GPU settings (no nvidia-smi -pm/-lgc/-ac, no resets): it only queries them.
# Exit status: 0 when the build worked and the bench ran (test failures are reported, not fatal:
# the numbers are still worth having); 1 when the build failed.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-check-out}
mkdir -p "$OUT"
LOGS=$(mktemp -d)   # one log per phase while running; all of them end up in $OUT/gpu_check.log
PY=${PYTHON:-$(command -v python3 || command -v python)}
TOTAL=${NMX_TOTAL_BUDGET:-450}
DRY=${NMX_GPU_CHECK_DRY:-0}
DEVICE=cuda
BENCH_DEFAULTS="--parts moments,tracker,count,scaling --repeat 5"
if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  BENCH_DEFAULTS="--parts moments,tracker,count,scaling --quick --shrink 32 --peers ours,reference,foreach_norm,stream --scaling-sizes 1e5,1e6 --counts 1,64 --count-total 262144"
fi
START=$SECONDS
STATUS=0

log() { echo "[$(date -u +%H:%M:%S) +$((SECONDS - START))s] $*"; }
left() { echo $((TOTAL - (SECONDS - START))); }

# run_phase NAME LIMIT CMD...: run with a hard time limit, output to $LOGS/NAME.log; tail it on failure.
run_phase() {
  local name=$1 limit=$2
  shift 2
  if [ "$limit" -lt 20 ]; then
    log "== $name: SKIPPED (only ${limit}s of the budget left)"
    return 124
  fi
  log "== $name (limit ${limit}s): $*"
  timeout -k 15 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then
    log "   $name ok"
  else
    [ $rc -eq 124 ] && log "   $name TIMED OUT after ${limit}s" || log "   $name FAILED (exit $rc)"
    echo "----- last lines of the $name log -----"
    tail -n 30 "$LOGS/$name.log"
    echo "-----------------------------------------"
  fi
  return $rc
}

log "neural-mechanics-ext GPU check in $ROOT; logs in $OUT; budget ${TOTAL}s"
{
  echo "git: $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?')"
  echo "python: $PY ($("$PY" --version 2>&1))"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,persistence_mode \
    --format=csv 2>&1 || echo "nvidia-smi not available"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc not on PATH (setup.py also looks in CUDA_HOME, /usr/local/cuda)"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'devices', torch.cuda.device_count())"
} 2>&1 | tee "$LOGS/environment.log"

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || true)
  [ -n "$ARCH" ] && export TORCH_CUDA_ARCH_LIST="$ARCH"
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
log "building for TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<setup.py default>} with MAX_JOBS=$MAX_JOBS"

# ---- 1. build in place (about 1-3 minutes) --------------------------------------------------------
LIMIT=$(( $(left) < 300 ? $(left) : 300 ))
if [ "$DRY" = 1 ] && ls neural_mechanics_ext/_C*.so >/dev/null 2>&1; then
  log "== build: DRY run, keeping $(ls neural_mechanics_ext/_C*.so)"
elif ! run_phase build "$LIMIT" "$PY" setup.py build_ext --inplace; then
  log "build failed: nothing to measure"
  cat "$LOGS"/*.log > "$OUT/gpu_check.log"
  exit 1
fi
NMX_DEVICE=$DEVICE "$PY" - <<'EOF' 2>&1 | tee "$LOGS/build_info.log"
import os
import sys
import neural_mechanics_ext as nmx
info = nmx.build_info()
print("package:", nmx.__file__)
print("build_info:", info)
if not info.get("compiled") or (os.environ["NMX_DEVICE"] == "cuda" and not info.get("cuda")):
    print("WARNING: the CUDA kernels are not in this build; the GPU numbers would be the reference's")
    sys.exit(3)
EOF
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
  cat "$LOGS"/*.log > "$OUT/gpu_check.log"
  log "the build has no CUDA kernels: stopping"
  exit 1
fi

# ---- 2. CUDA tests (op against the reference on the GPU, tracker CUDA vs CPU) ---------------------
LIMIT=$(( $(left) - 240 ))          # keep about 4 minutes for the profile and the benchmarks
LIMIT=$(( LIMIT > 120 ? 120 : LIMIT ))
run_phase tests "$LIMIT" "$PY" -m pytest tests -m cuda -q -p no:cacheprovider -o addopts="" || STATUS=$?
grep -E "passed|failed|error" "$LOGS/tests.log" | tail -n 3

# ---- 3. GB/s of each kernel path on 200 MB tensors (rows, columns, both, bf16 g) against copy -------
if [ "$DEVICE" = cuda ]; then
  LIMIT=$(( $(left) - 200 ))
  LIMIT=$(( LIMIT > 45 ? 45 : LIMIT ))
  run_phase profile "$LIMIT" "$PY" bench/profile_moments.py --device cuda --paths-only --rounds 5 &&
    grep -E "GB/s|fixed cost" "$LOGS/profile.log"
fi

# ---- 4. benchmarks --------------------------------------------------------------------------------
[ -f bench/RESULTS.md ] && cp bench/RESULTS.md "$OUT/RESULTS.md"
BENCH_LIMIT=$(( $(left) - 15 ))
BENCH_BUDGET=$(( BENCH_LIMIT * 80 / 100 ))   # the soft budget; the rest covers compile and one slow call
# shellcheck disable=SC2086
run_phase bench "$BENCH_LIMIT" "$PY" -m neural_mechanics_ext bench --device "$DEVICE" --budget "$BENCH_BUDGET" \
  --out "$OUT/bench" --results "$OUT/RESULTS.md" $BENCH_DEFAULTS ${NMX_BENCH_ARGS:-} || STATUS=$?

# ---- 5. the short table (also from a partial results.json when the bench was cut) -----------------
echo
if [ -f "$OUT/bench/results.json" ]; then
  "$PY" - "$OUT/bench/results.json" <<'EOF'
import json, sys
from neural_mechanics_ext.bench import compact_summary, evaluate_goals
results = json.load(open(sys.argv[1]))
results.setdefault("goals", evaluate_goals(results))
print(compact_summary(results))
EOF
else
  log "no results.json was written"
fi
echo
for f in environment build_info build tests profile bench; do
  [ -f "$LOGS/$f.log" ] && { echo "===== $f ====="; cat "$LOGS/$f.log"; }
done > "$OUT/gpu_check.log"
log "done (tests/bench status $STATUS); files in $OUT:"
ls -la "$OUT" "$OUT/bench" 2>/dev/null | sed 's/^/   /'
exit 0
