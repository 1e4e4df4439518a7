#!/usr/bin/env bash
# Device calls of the eighth H200 session (issue 6: batch-64 throughput). From the repository root; logs to $OUT.
#   profile  build; per-kernel split of a batch-1 and a batch-64 render (untrained uv-128 avatar, bf16) and the
#            MLP's hidden layer in bf16 / fp8 variants (benchmarks/profile_batch.py)
#   final    build; the whole suite; the batch-64 kernel split; `bench_end_to_end.py` (untrained uv 128 and 256,
#            bf16, batches 1/16/64); the EMD benchmark at N = 4096 (after the emd.cu clean-up)
#   raster   build; the rasteriser's and the MLP layer ops' tests
# The blend variants of results/profile_batch_h200.md (1 / 4 alphas ahead, two pixels per thread) were compared
# through a temporary build-time switch (FLASHAVATAR_RAST_FWD_ILP), removed once the 4-ahead kernel was kept.
set -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_setup.sh  # OUT, WORK, environment, peer wheels, `el`, build
profile() {  # name, extra args
  timeout 240 python3 benchmarks/profile_batch.py --batch-sizes 1 64 --out "$OUT/profile_batch_$1.json" "${@:2}" \
    >"$OUT/profile_batch_$1.log" 2>&1
  el "profile $1 rc=$?"; grep -v "Warning\|warn" "$OUT/profile_batch_$1.log" | grep -v "^ .*us .*% .*x  1.0  void at::\|Memset" | cut -c1-150 | head -${LINES_SHOWN:-60}
}
if [ "${1:-profile}" = profile ]; then
  profile base
elif [ "$1" = final ]; then
  timeout 330 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests >"$OUT/pytest_all.log" 2>&1
  el "pytest rc=$?"; tail -1 "$OUT/pytest_all.log"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_all.log" | head -20
  LINES_SHOWN=24 profile final --batch-sizes 64 --kernels-only
  timeout 200 python3 benchmarks/bench_end_to_end.py --out "$OUT/end_to_end_untrained_nvidia_h200.json" --no-gsplat \
    --no-compile --dtypes bf16 --batch-sizes 1 16 64 --max-seconds 150 >"$OUT/end_to_end_untrained_nvidia_h200.log" 2>&1
  el "e2e rc=$?"; grep -v "^  batch" "$OUT/end_to_end_untrained_nvidia_h200.log" | grep -i "graph\|fps\|ms" | tail -24
  timeout 60 python3 benchmarks/bench_emd.py --sizes 4096 --batches 1 16 --pot-max-n 1024 --no-geomloss \
    --budget-s 40 --out "$OUT/emd_check.json" >"$OUT/emd_check.log" 2>&1
  el "emd rc=$?"; tail -6 "$OUT/emd_check.log"
elif [ "$1" = raster ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_rasterize_cuda.py \
    tests/test_mlp_layers.py >"$OUT/pytest_raster_final.log" 2>&1
  el "raster tests rc=$?"; tail -1 "$OUT/pytest_raster_final.log"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_raster_final.log"
fi
el total
