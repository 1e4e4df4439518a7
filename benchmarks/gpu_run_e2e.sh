#!/usr/bin/env bash
# One device call for issue 6: build the extension, run the fast-path tests (CPU + CUDA), then the end-to-end
# benchmark (with gsplat when its JIT build, started in the background, is ready in time). Run from the
# repository root (or a copy of it) with the carried wheels in .whl/; logs and JSON go to $OUT.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
t0=$(date +%s)
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >"$OUT/pip.log" 2>&1 || echo "pip install of carried wheels failed (see pip.log)"
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
if [ -z "${NO_GSPLAT:-}" ]; then
  (MAX_JOBS=8 python3 -c "from gsplat.cuda._backend import _C; print('gsplat built', _C is not None)" \
    >"$OUT/gsplat_build.log" 2>&1 &)
fi
MAX_JOBS=8 python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 ))s"
python3 -m pytest tests/test_fast_path.py tests/test_assembly.py tests/test_flame_lbs.py -q -p no:cacheprovider 2>&1 \
  | tee "$OUT/pytest_fast_path.log" | tail -6
GS="--no-gsplat"
if [ -z "${NO_GSPLAT:-}" ]; then
  # wait for gsplat at most until GSPLAT_DEADLINE seconds after the start
  while [ $(( $(date +%s) - t0 )) -lt ${GSPLAT_DEADLINE:-330} ]; do
    grep -q "gsplat built\|Error" "$OUT/gsplat_build.log" 2>/dev/null && break; sleep 5; done
  tail -1 "$OUT/gsplat_build.log"; grep -q "gsplat built True" "$OUT/gsplat_build.log" && GS=""
fi
echo "bench start: $(( $(date +%s) - t0 ))s ($GS)"
timeout ${BENCH_TIMEOUT:-400} python3 benchmarks/bench_end_to_end.py --out "$OUT" $GS ${BENCH_ARGS:-} 2>&1 \
  | tee "$OUT/bench.log" | grep -v "^  batch"
echo "total: $(( $(date +%s) - t0 ))s"
