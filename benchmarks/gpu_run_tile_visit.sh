#!/usr/bin/env bash
# Device calls of the fifth H200 session (2026-12-03): the warp-wide tile visit of project/emit (trained avatars'
# large Gaussians) and the gpu preset's new setting (uv 256 + shading, 15,000 iterations).
# From the repository root; logs to $OUT (at most ~8 files come back). Carry .whl for the full suite.
#   check   build; the whole test suite beside the subject synthesis and a uv-128 training (8,000 iterations,
#           the earlier preset's setting: the benchmarks' default avatar); then, solo, `flashavatar bench --run`
#           on it (bf16, batches 1/16/64) and bench_rasterize (its first frame's per-kernel split, head-like scenes)
#   preset  the gpu preset as it ships (evaluating every 500 iterations), the whole test split, and
#           `flashavatar bench --run` on that avatar (bf16, batches 1/16/64); an MLP chunk-size sweep (uv 128)
#   final   after the Python-only changes that followed (MLP chunks of 2^20 rows on a GPU, the Animator's shading
#           as a quadratic form): the fast-path / avatar / training tests, `flashavatar bench --run` on a uv-128
#           training (8,000 its) and on a short gpu-preset training (uv 256 + shading, 3,000 its: the shading
#           stage's cost), and the untrained benchmark avatars (uv 128 and 256, batches 1/16/64)
#   mlp     the fused MLP kernel (csrc/mlp/): its tests and the fast path's GPU tests, then the untrained uv-128
#           avatar at batches 1/16/64 with the fused MLP and with the cuBLAS GEMMs (`--fused-mlp on|off`)
set -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_setup.sh  # OUT, WORK, environment, peer wheels, `el`, build
DATA="$WORK/synth_300x512"
T="python3 -m flashavatar.cli train --data $DATA --subject synthetic --preset gpu --no-progress --set data.n_test=100
   --set train.tensorboard=false"
bench_run() {  # name, run dir
  timeout 150 python3 -m flashavatar.cli bench --run "$2" --dtypes bf16 --batch-sizes 1 16 64 --no-gsplat \
    --out "$OUT/end_to_end_$1.json" >"$OUT/end_to_end_$1.log" 2>&1; el "bench $1 rc=$?"
  grep -v "^  batch" "$OUT/end_to_end_$1.log" | grep -i "graph\|fps\|frames\|stage\|ms" | tail -14
}
if [ "${1:-check}" = check ]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests >"$OUT/pytest_all.log" 2>&1 &
  PYTEST=$!
  [ -d "$DATA/synthetic" ] || python3 -m flashavatar.cli synth "$DATA" --frames 300 --size 512 >/tmp/synth.log 2>&1
  el "synth rc=$?"
  timeout 150 $T --out "$WORK/run_uv128" --set model.uv_size=128 --set model.shading=false \
    --set loss.perceptual_from=3000 --set train.iterations=8000 --set train.eval_every=0 2>&1 \
    | grep -v "^INFO flashavatar.rasterize" >"$OUT/train_uv128.log"
  el "train uv128 rc=$?"; grep -i "trained to\|error\|test (32" "$OUT/train_uv128.log" | cut -c1-250 | head -5
  wait $PYTEST; el "pytest rc=$?"; tail -2 "$OUT/pytest_all.log"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_all.log" | head
  bench_run trained_uv128 "$WORK/run_uv128"
  timeout 150 python3 benchmarks/bench_rasterize.py --quick --no-gsplat --sizes 15000,50000 --run "$WORK/run_uv128" \
    --out "$OUT/rasterize.json" 2>&1 | grep -v "Warning\|_warn_once\|^{" >"$OUT/rasterize.log"; el "raster rc=$?"
  tail -42 "$OUT/rasterize.log"
elif [ "$1" = preset ]; then
  [ -d "$DATA/synthetic" ] || python3 -m flashavatar.cli synth "$DATA" --frames 300 --size 512 >/tmp/synth.log 2>&1
  el "synth rc=$?"
  timeout 300 $T --out "$WORK/run_preset" 2>&1 | grep -v "^INFO flashavatar.rasterize" >"$OUT/train_preset.log"
  el "train preset rc=$?"; grep -v "captured the step" "$OUT/train_preset.log" | tail -6 | cut -c1-250
  cp "$WORK/run_preset/train_summary.json" "$OUT/train_summary_preset.json" 2>/dev/null
  python3 -m flashavatar.cli render --run "$WORK/run_preset" --out "$WORK/eval_preset" --no-frames --no-video 2>&1 \
    | grep -v "render:" >"$OUT/render_preset.log"; el "render rc=$?"; grep "test split" "$OUT/render_preset.log"
  bench_run trained_preset "$WORK/run_preset"
  # MLP chunk size at batches 16 / 64 (an H100 sweep preferred one GEMM per layer; not yet measured on the H200)
  timeout 120 python3 -m flashavatar.cli bench --uv-size 128 --dtypes bf16 --batch-sizes 16 64 --no-gsplat \
    --sweep-mlp-rows 32768 262144 2000000 --sweep-only --out "$OUT/mlp_rows.json" >"$OUT/mlp_rows.log" 2>&1
  el "mlp rows rc=$?"; grep -i "rows\|ms" "$OUT/mlp_rows.log" | tail -12
fi
if [ "$1" = mlp ]; then
  timeout 75 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_fused_mlp.py tests/test_fast_path.py \
    -k "cuda and (fused or 45db or graph or kernel)" >"$OUT/pytest_mlp.log" 2>&1
  el "pytest rc=$?"; tail -1 "$OUT/pytest_mlp.log"; grep -E "^(FAILED|ERROR)|Error" "$OUT/pytest_mlp.log" | head -8
  for f in on off; do
    timeout 35 python3 -m flashavatar.cli bench --uv-size 128 --dtypes bf16 --batch-sizes 1 64 --no-gsplat --no-compile \
      --repeats 20 --warmup 3 --max-seconds 25 --fused-mlp $f --out "$OUT/end_to_end_mlp_$f.json" \
      >"$OUT/end_to_end_mlp_$f.log" 2>&1
    el "bench fused-mlp $f rc=$?"; grep "fused MLP\|fast bf16 .*graph\|  bf16  graph" "$OUT/end_to_end_mlp_$f.log" | head -8
  done
fi
if [ "$1" = final ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_fast_path.py tests/test_avatar.py \
    tests/test_train_cuda.py tests/test_train.py >"$OUT/pytest_final.log" 2>&1 &
  PYTEST=$!
  [ -d "$DATA/synthetic" ] || python3 -m flashavatar.cli synth "$DATA" --frames 300 --size 512 >/tmp/synth.log 2>&1
  el "synth rc=$?"
  wait $PYTEST; el "pytest rc=$?"; tail -1 "$OUT/pytest_final.log"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_final.log" | head
  timeout 100 $T --out "$WORK/run_uv128" --set model.uv_size=128 --set model.shading=false \
    --set loss.perceptual_from=3000 --set train.iterations=8000 --set train.eval_every=0 >/tmp/train_uv128.log 2>&1
  el "train uv128 rc=$?"; grep -i "trained to" /tmp/train_uv128.log | cut -c1-200
  bench_run final_trained_uv128 "$WORK/run_uv128"
  timeout 100 $T --out "$WORK/run_preset3k" --set train.iterations=3000 --set train.eval_every=0 >/tmp/train_p3k.log 2>&1
  el "train preset 3k rc=$?"; grep -i "trained to" /tmp/train_p3k.log | cut -c1-200
  bench_run final_preset3k "$WORK/run_preset3k"
  timeout 200 python3 benchmarks/bench_end_to_end.py --out "$OUT/end_to_end_final_untrained.json" --no-gsplat \
    --no-compile --dtypes bf16 --batch-sizes 1 16 64 --max-seconds 150 >"$OUT/end_to_end_final_untrained.log" 2>&1
  el "e2e untrained rc=$?"; grep -v "^  batch" "$OUT/end_to_end_final_untrained.log" | grep -i "graph\|fps" | tail -14
fi
el total
