#!/usr/bin/env bash
# Everything a GPU session owes, in one device call that ends within BUDGET seconds
# (default 540: a 10-minute call with room to copy the results back). On the GPU
# machine (no package index needed) it builds in place for this GPU only, then runs,
# most valuable first and each cut off by what is left of the budget:
#   0. preflight: one line naming python, torch, CUDA, the GPU, nproc, ninja, pytest,
#      compute-sanitizer and nvcc; it stops here, at once, without a GPU, nvcc or
#      pytest, and drops the memcheck phase without compute-sanitizer
#   1. the kernel CUDA tests (adaln, tmsa, skip_concat_linear, int8)
#   2. compute-sanitizer memcheck over a small TMSA + GEMM subset
#   3. the benchmarks, families in FAMILIES order (results.json is rewritten after
#      each family, so a run cut short keeps what it measured)
#   4. the remaining CUDA tests (models, quantization, diffusion)
# Each phase's outcome and seconds go to stdout and summary.txt.
# OUT gets at most 8 files: summary.txt (preflight, device, build info, each phase's
# outcome and seconds), build.log, tests.log, memcheck.log, bench.log, results.json,
# results.md.
# Usage: benchmarks/gpu_check.sh [--preflight] OUT [BUDGET_S] [run.py args]
#   --preflight: the preflight line alone (exit 1 if a phase could not run).
#   DITKERNELS_BENCH_COMMIT: the commit the tables name where the copy has no .git.
set -uo pipefail
preflight_only=0
if [ "${1:-}" = "--preflight" ]; then
  preflight_only=1
  shift
fi
OUT=$(realpath -m "${1:?usage: benchmarks/gpu_check.sh [--preflight] OUT [BUDGET_S] [run.py args]}")
BUDGET=${2:-540}
shift $(( $# >= 2 ? 2 : 1 ))
# The kernels first, then the whole models, whose torch.compile baselines take the
# longest to compile (DiT-XL/2 could otherwise spend the phase's budget alone).
FAMILIES=${FAMILIES:-tmsa,adaln,skip_concat_linear,int8,dit,uvit,diffusers}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
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
  local t0 rc=0
  t0=$(date +%s)
  echo "== $name (at most ${limit}s)" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1 || rc=$?
  local verdict="ok"
  (( rc == 124 || rc == 137 )) && verdict="cut off at ${limit}s"
  (( rc != 0 && rc != 124 && rc != 137 )) && verdict="failed (exit $rc)"
  echo "$name: $verdict in $(( $(date +%s) - t0 ))s" | tee -a "$summary"
  (( rc == 0 )) || status=1
  return $rc
}

# ---- preflight: what this machine has, in one line, and what that rules out --------
py_facts=$(timeout 60 python -c "
import importlib.util, torch
from torch.utils.cpp_extension import is_ninja_available
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'
cap = ''
if torch.cuda.is_available():
    c = torch.cuda.get_device_capability()
    cap = '%d.%d%s' % (c[0], c[1], 'a' if c == (9, 0) else '')
print(torch.__version__, torch.version.cuda or 'none', gpu.replace(' ', '_'), cap or 'none',
      'yes' if is_ninja_available() else 'no',
      'yes' if importlib.util.find_spec('pytest') else 'no')
" 2>/dev/null) || py_facts=""
read -r torch_version torch_cuda gpu cap ninja pytest <<<"${py_facts:-none none none none no no}"
# The toolkit setup.py builds with: CUDA_HOME, CUDA_PATH, /usr/local/cuda, nvcc's.
nvcc=absent
for root in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
  if [ -n "$root" ] && [ -x "$root/bin/nvcc" ]; then nvcc=$root/bin/nvcc; break; fi
done
[ "$nvcc" = absent ] && nvcc=$(command -v nvcc || echo absent)
sanitizer=$(command -v compute-sanitizer || echo absent)
if [ "$sanitizer" = absent ] && [ -x "$(dirname "$nvcc")/compute-sanitizer" ]; then
  sanitizer=$(dirname "$nvcc")/compute-sanitizer
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# setup.py asks for ninja; without it torch's builder falls back to compiling one file
# at a time (about 925 s for the CUDA sources, once measured), so say so.
build_mode=$( [ "$ninja" = yes ] && echo "parallel build, MAX_JOBS=$MAX_JOBS" ||
  echo "serial distutils build, MAX_JOBS=$MAX_JOBS unused")
echo "preflight: python $(python -c 'import platform; print(platform.python_version())' 2>/dev/null || echo absent)" \
  "| torch $torch_version (CUDA $torch_cuda) | GPU ${gpu//_/ } (sm $cap) | nproc $(nproc)" \
  "| ninja $ninja ($build_mode) | pytest $pytest | compute-sanitizer $sanitizer" \
  "| nvcc $nvcc" | tee -a "$summary"
missing=()
[ "$torch_version" = none ] && missing+=("python with torch")
[ "$gpu" = none ] && missing+=("a visible CUDA GPU")
[ "$nvcc" = absent ] && missing+=("nvcc")
[ "$pytest" = no ] && missing+=("pytest")
if (( ${#missing[@]} )); then
  joined=$(printf '%s, ' "${missing[@]}")
  echo "preflight: cannot run, missing: ${joined%, }" | tee -a "$summary"
  exit 1
fi
if [ "$sanitizer" = absent ]; then
  echo "preflight: no compute-sanitizer, the memcheck phase is skipped" | tee -a "$summary"
fi
(( preflight_only )) && exit 0

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
} >>"$summary" 2>&1

# Only this machine's architecture: half the default build time.
# Hopper gets 9.0a, which the wgmma kernels need.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap}
if ! phase "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, $build_mode)" 300 \
    "$OUT/build.log" python setup.py build_ext --inplace; then
  tail -40 "$OUT/build.log"
  exit 1
fi
python -c "import ditkernels, json; print(json.dumps(ditkernels.build_info()))" >>"$summary" 2>&1

kernel_tests="python_tests/test_adaln.py python_tests/test_tmsa.py python_tests/test_skip_concat_linear.py python_tests/test_int8.py"
# shellcheck disable=SC2086
phase "kernel CUDA tests" 150 "$OUT/tests.log" \
  python -m pytest $kernel_tests -m cuda -q -rs -p no:cacheprovider
tail -3 "$OUT/tests.log"

if [ "$sanitizer" != absent ]; then
  phase "compute-sanitizer memcheck" 90 "$OUT/memcheck.log" \
    "$sanitizer" --tool memcheck --error-exitcode 3 --print-limit 20 \
    python -m pytest python_tests/test_tmsa.py python_tests/test_skip_concat_linear.py \
    python_tests/test_int8.py python_tests/test_adaln.py -m cuda -q -p no:cacheprovider \
    -k "optional_time_and_table or in_place or non_contiguous or mixed_timesteps or empty"
  tail -3 "$OUT/memcheck.log"
fi

if [ $# -eq 0 ]; then set -- --min-run-time 0.2; fi
phase "benchmarks ($FAMILIES)" 400 "$OUT/bench.log" \
  python benchmarks/run.py --out "$OUT" --families "$FAMILIES" "$@"
tail -3 "$OUT/bench.log"

# shellcheck disable=SC2086,SC2046
phase "other CUDA tests" 300 "$OUT/tests.log" \
  python -m pytest python_tests -m cuda -q -rs -p no:cacheprovider \
  $(for f in $kernel_tests; do printf -- '--ignore=%s ' "$f"; done)
tail -3 "$OUT/tests.log"

echo "total: $(( $(date +%s) - start ))s of $BUDGET" | tee -a "$summary"
exit $status
