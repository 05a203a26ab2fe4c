#!/usr/bin/env bash
# Everything a GPU session owes, in one device call that ends within BUDGET seconds
# (default 540: a 10-minute call with room to copy the results back). On the GPU
# machine (no package index needed) it builds in place for this GPU only, then runs,
# most valuable first and each cut off by what is left of the budget:
#   1. the kernel CUDA tests (adaln, tmsa, skip_concat_linear, int8)
#   2. compute-sanitizer memcheck over a small TMSA + GEMM subset
#   3. the benchmarks, families in FAMILIES order (results.json is rewritten after
#      each family, so a run cut short keeps what it measured)
#   4. the remaining CUDA tests (models, quantization, diffusion)
# OUT gets at most 8 files: summary.txt (device, build info, each phase's outcome and
# seconds), build.log, tests.log, memcheck.log, bench.log, results.json, results.md.
# Usage: benchmarks/gpu_check.sh OUT [BUDGET_S] [run.py args]
set -uo pipefail
OUT=$(realpath -m "${1:?usage: benchmarks/gpu_check.sh OUT [BUDGET_S] [run.py args]}")
BUDGET=${2:-540}
shift $(( $# >= 2 ? 2 : 1 ))
FAMILIES=${FAMILIES:-tmsa,dit,skip_concat_linear,int8,uvit,adaln}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
start=$(date +%s)
status=0
summary="$OUT/summary.txt"
: >"$summary"

left() { echo $(( BUDGET - ($(date +%s) - start) )); }
# phase NAME MAX_S LOG CMD...: runs CMD for at most min(MAX_S, budget left - 20) s.
phase() {
  local name=$1 max=$2 log=$3
  shift 3
  local limit=$(( $(left) - 20 ))
  if (( limit < 10 )); then
    echo "$name: skipped, budget spent" | tee -a "$summary"
    return 1
  fi
  (( limit > max )) && limit=$max
  local t0=$(date +%s) rc=0
  echo "== $name (at most ${limit}s)" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1 || rc=$?
  local verdict="ok"
  (( rc == 124 || rc == 137 )) && verdict="cut off at ${limit}s"
  (( rc != 0 && rc != 124 && rc != 137 )) && verdict="failed (exit $rc)"
  echo "$name: $verdict in $(( $(date +%s) - t0 ))s" | tee -a "$summary"
  (( rc == 0 )) || status=1
  return $rc
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} >>"$summary" 2>&1

# Only this machine's architecture: half the default build time.
# Hopper gets 9.0a, which the wgmma kernels need.
cap=$(python -c "import torch; c = torch.cuda.get_device_capability(); print('%d.%d%s' % (c[0], c[1], 'a' if c == (9, 0) else ''))")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if ! phase "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)" 300 "$OUT/build.log" \
    python setup.py build_ext --inplace; then
  tail -40 "$OUT/build.log"
  exit 1
fi
python -c "import ditkernels, json; print(json.dumps(ditkernels.build_info()))" >>"$summary" 2>&1

kernel_tests="python_tests/test_adaln.py python_tests/test_tmsa.py python_tests/test_skip_concat_linear.py python_tests/test_int8.py"
# shellcheck disable=SC2086
phase "kernel CUDA tests" 150 "$OUT/tests.log" \
  python -m pytest $kernel_tests -m cuda -q -rs -p no:cacheprovider
tail -3 "$OUT/tests.log"

sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
phase "compute-sanitizer memcheck" 90 "$OUT/memcheck.log" \
  "$sanitizer" --tool memcheck --error-exitcode 3 --print-limit 20 \
  python -m pytest python_tests/test_tmsa.py python_tests/test_skip_concat_linear.py \
  python_tests/test_int8.py python_tests/test_adaln.py -m cuda -q -p no:cacheprovider \
  -k "optional_time_and_table or in_place or non_contiguous or mixed_timesteps or empty"
tail -3 "$OUT/memcheck.log"

if [ $# -eq 0 ]; then set -- --min-run-time 0.2; fi
phase "benchmarks ($FAMILIES)" 400 "$OUT/bench.log" \
  python benchmarks/run.py --out "$OUT" --families "$FAMILIES" "$@"
tail -3 "$OUT/bench.log"

# shellcheck disable=SC2086
phase "other CUDA tests" 300 "$OUT/tests.log" \
  python -m pytest python_tests -m cuda -q -rs -p no:cacheprovider \
  $(for f in $kernel_tests; do printf -- '--ignore=%s ' "$f"; done)
tail -3 "$OUT/tests.log"

echo "total: $(( $(date +%s) - start ))s of $BUDGET" | tee -a "$summary"
exit $status
