#!/usr/bin/env bash
# On a GPU machine (no package index needed): build in place, run the CUDA tests,
# run compute-sanitizer memcheck over a small subset, then the benchmark suite.
# Logs and tables go to OUT. Usage: benchmarks/gpu_check.sh OUT [run.py args]
# Without run.py args every family runs with 0.2 s per measurement; pass e.g.
# `--families adaln,tmsa` to fit a run into a shorter lease (results.json is written
# after each family, so a run cut short keeps what it measured).
set -uo pipefail
OUT=$(realpath -m "${1:?usage: benchmarks/gpu_check.sh OUT [run.py args]}")
shift
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
status=0

# Only this machine's architecture: a quarter of the default build time.
cap=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
if ! python setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
python -c "import ditkernels, json; print(json.dumps(ditkernels.build_info()))" | tee "$OUT/build_info.json"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$OUT/gpu.txt" 2>&1

echo "== CUDA tests"
python -m pytest python_tests -m cuda -q -rs -p no:cacheprovider >"$OUT/tests_cuda.log" 2>&1 || status=1
tail -5 "$OUT/tests_cuda.log"

echo "== compute-sanitizer memcheck (subset)"
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -x "$sanitizer" ]; then
  "$sanitizer" --tool memcheck --error-exitcode 3 --print-limit 20 \
    python -m pytest python_tests/test_adaln.py -m cuda -q -p no:cacheprovider \
    -k "cuda and (feature_sizes or non_contiguous or empty or deterministic)" \
    >"$OUT/memcheck.log" 2>&1 || status=1
  tail -5 "$OUT/memcheck.log"
else
  echo "compute-sanitizer not found" | tee "$OUT/memcheck.log"
  status=1
fi

echo "== benchmarks"
if [ $# -eq 0 ]; then set -- --min-run-time 0.2; fi
python benchmarks/run.py --out "$OUT" "$@" >"$OUT/bench.log" 2>&1 || status=1
tail -3 "$OUT/bench.log"
exit $status
