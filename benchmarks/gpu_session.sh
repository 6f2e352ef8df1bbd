#!/usr/bin/env bash
# The first GPU session's checks as ONE prepared command for the device tool (15 min of device time per
# session, 10 min per command): build the CUDA extension, run the gpu-marked tests, compute-sanitizer on
# the CUDA kernels, and the GPU benchmarks that issues #3-#7 wait for. Everything goes to $OUT/log.txt
# and $OUT/results.csv (the device tool returns at most 8 files). The stages' limits add up to more
# than one command's 10 minutes, so call it twice, back to back (the machine stays warm 30 s and keeps
# the build in between):
#     run(command="STAGES='build tests' bash benchmarks/gpu_session.sh", timeout_s=560)
#     run(command="STAGES='build sanitize bench' bash benchmarks/gpu_session.sh", timeout_s=590)
# (the second build is a no-op on a warm machine), then commit the CSV rows under benchmarks/results/
# with the device, date and commit. STAGES selects stages; a rerun can skip what passed.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
CSV="$OUT/results.csv"
STAGES=${STAGES:-"build tests sanitize bench"}
export PYTHONUNBUFFERED=1 FLASHDISTILL_CUDA=1
PY=${PY:-python3}
t0=$(date +%s)

step() {  # step NAME SECONDS CMD...: runs CMD with a time limit, its output into the log
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s, at $(( $(date +%s) - t0 ))s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc" | tee -a "$LOG"
  return 0
}
has() { [[ " $STAGES " == *" $1 "* ]]; }

{ echo "date $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null)"; nvidia-smi -L; } >> "$LOG" 2>&1
if has build; then
  step build 170 env MAX_JOBS=16 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  step info 30 "$PY" -m flashdistill.engine.cli info
fi
if has tests; then  # the engine's, the attention's and the samplers' first: they have never run on a GPU
  step gpu_tests_first 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_capture.py \
    tests/test_attention.py tests/test_sampling.py
  step gpu_tests_rest 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider --ignore tests/test_attention.py \
    --ignore tests/test_sampling.py --ignore tests/test_capture.py tests/
fi
if has sanitize; then
  for tool in racecheck synccheck memcheck; do
    step "sanitizer_$tool" 60 compute-sanitizer --tool "$tool" --error-exitcode 3 "$PY" benchmarks/gpu_sanitize.py
  done
fi
if has bench; then
  step bench_engine 90 "$PY" benchmarks/bench_engine.py --csv "$CSV"
  step bench_attention 100 "$PY" benchmarks/bench_attention.py --quick --csv "$CSV"
  step bench_dmd 60 "$PY" benchmarks/bench_dmd.py --quick --csv "$CSV"
  step bench_samplers 60 "$PY" benchmarks/bench_samplers.py --quick --csv "$CSV"
  step bench_score_losses 80 "$PY" benchmarks/bench_score_losses.py --quick --no-compile --csv "$CSV"
fi
echo "=== done in $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
