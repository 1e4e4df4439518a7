#!/usr/bin/env bash
# One device call: build the extension, run the GPU tests, benchmark against gsplat 1.5.3 (compiled in the
# background meanwhile). Run from the repository root of the checkout (or a copy of it); logs go to $OUT.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
WHL=${WHL:-../../.whl}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHL/*.whl \
  >"$OUT/pip.log" 2>&1 || echo "pip install of carried wheels failed (see pip.log)"
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
# gsplat JIT-compiles its CUDA on first import; start it now, it needs minutes.
(MAX_JOBS=12 python3 -c "from gsplat.cuda._backend import _C; print('gsplat built', _C is not None)" \
  >"$OUT/gsplat_build.log" 2>&1 &)
t0=$(date +%s)
MAX_JOBS=4 python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 ))s"; grep -i "spill\|error" "$OUT/build.log" | head -5
python3 -m pytest tests/test_rasterize_cuda.py -q -p no:cacheprovider --durations=5 2>&1 | tee "$OUT/pytest_cuda.log" | tail -25
echo "waiting for gsplat build..."; for i in $(seq 1 60); do grep -q "gsplat built\|Error" "$OUT/gsplat_build.log" && break; sleep 5; done
tail -2 "$OUT/gsplat_build.log"
python3 benchmarks/bench_rasterize.py ${BENCH_ARGS:-} --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | grep -v '^{'
