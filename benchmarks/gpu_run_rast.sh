#!/usr/bin/env bash
# One device call for the rasteriser work (fits a 330 s limit): build, rasteriser tests, benchmark vs gsplat.
# Run from a copy of the repository whose parent holds .whl/ (the carried wheels); logs go to $OUT.
#   BENCH_ARGS="--quick --sizes 15000,50000" bash benchmarks/gpu_run_rast.sh
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site ../.whl/*.whl \
  >"$OUT/pip.log" 2>&1 || echo "pip install of carried wheels failed (see pip.log)"
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
(MAX_JOBS=8 python3 -c "from gsplat.cuda._backend import _C; print('gsplat built', _C is not None)" \
  >"$OUT/gsplat_build.log" 2>&1 &)
t0=$(date +%s)
MAX_JOBS=16 python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 ))s"
timeout ${TEST_TIMEOUT:-90} python3 -m pytest -q -p no:cacheprovider tests/test_rasterize_cuda.py tests/test_rasterize.py \
  2>&1 | tail -25 >"$OUT/pytest.log"
tail -4 "$OUT/pytest.log"; echo "tests done at $(( $(date +%s) - t0 ))s"
timeout ${BENCH_TIMEOUT:-170} python3 benchmarks/bench_rasterize.py ${BENCH_ARGS:---quick} --out "$OUT/bench.json" \
  >"$OUT/bench.log" 2>&1
echo "bench rc=$? at $(( $(date +%s) - t0 ))s"; grep -v '^{' "$OUT/bench.log" | grep -v "Warning\|_warn_once" | tail -90
