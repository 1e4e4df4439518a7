#!/usr/bin/env bash
# Device calls for the forward-blend split (third and fourth H200 sessions, 2026-12-03; the split is the default
# again since the fourth, FLASHAVATAR_RAST_FWD=single turns it off; `debug` sets it per run, `confirm` runs the
# default).
# From the repository root; logs to $OUT. Carry .whl for the full suite (pot, geomloss).
#   fwd     build, the rasteriser / fast-path GPU tests, bench_rasterize (forward split vs single), end-to-end bench
#           (untrained uv 128: split at batches 1/16/64, FLASHAVATAR_RAST_FWD=single at batch 1)
#   check   a short gpu-preset training (uv 128, TRAIN_ITS iterations) and `flashavatar bench --run` on it with the
#           split and the single forward; REPRO_SET: a training configuration to re-run (a crash seen in a parallel
#           run); then the whole test suite
#   debug   the whole test suite beside the split-crash hunt: gpu-preset training with the split under faulthandler
#           (a Python stack if it segfaults), then a single-forward run to 1,500 iterations resumed for 3 eager
#           split steps under compute-sanitizer memcheck and initcheck (one cudaMalloc per tensor), then the
#           end-to-end bench (untrained uv 128, single and split)
#   confirm the whole test suite (beside the synthesis only), then two gpu-preset trainings at once with the split
#           as the default (uv 128 to TRAIN_ITS; uv 192 + colour head to 6,000, the configuration that crashed),
#           `flashavatar bench --run` on the uv-128 run (default and single), bench_rasterize
set -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_setup.sh  # OUT, WORK, environment, peer wheels, `el`, build
e2e() {  # variant (split|single), batch sizes..., [--run DIR via RUN_DIR]
  local v=$1; shift
  export FLASHAVATAR_RAST_FWD=$v
  if [ -n "${RUN_DIR:-}" ]; then
    timeout 150 python3 -m flashavatar.cli bench --run "$RUN_DIR" --dtypes bf16 --batch-sizes "$@" --no-gsplat \
      --out "$OUT/e2e_trained_$v.json" >"$OUT/e2e_trained_$v.log" 2>&1; el "e2e trained $v rc=$?"
    grep -v "^  batch" "$OUT/e2e_trained_$v.log" | grep -i "graph\|fps\|frames" | tail -8
  else
    timeout 150 python3 benchmarks/bench_end_to_end.py --out "$OUT/e2e_$v.json" --no-gsplat --no-compile --dtypes bf16 \
      --uv-size 128 --batch-sizes "$@" --max-seconds 90 >"$OUT/e2e_$v.log" 2>&1; el "e2e $v rc=$?"
    grep -v "^  batch" "$OUT/e2e_$v.log" | grep -i "graph\|fps\|frames" | tail -10
  fi
  unset FLASHAVATAR_RAST_FWD
}
if [ "${1:-fwd}" = debug ]; then
  DATA="$WORK/synth_300x512"
  timeout ${TEST_TIMEOUT:-260} python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests >"$OUT/pytest_all.log" 2>&1 &
  PYTEST=$!
  python3 -m flashavatar.cli synth "$DATA" --frames 300 --size 512 >"$OUT/synth.log" 2>&1; el "synth rc=$?"
  T="python3 -X faulthandler -m flashavatar.cli train --data $DATA --subject synthetic --preset gpu --no-progress
     --set data.n_test=100 --set train.tensorboard=false"
  FLASHAVATAR_RAST_FWD=split timeout ${SPLIT_TIMEOUT:-110} $T --out "$WORK/run_split" --set train.iterations=${TRAIN_ITS:-3000} \
    --set train.eval_every=500 >"$OUT/train_split.log" 2>&1; el "train split rc=$?"
  grep -v "^INFO flashavatar.rasterize" "$OUT/train_split.log" | tail -30 | cut -c1-250
  FLASHAVATAR_RAST_FWD=single timeout 90 $T --out "$WORK/run_single" --set train.iterations=1500 \
    >"$OUT/train_single.log" 2>&1
  el "train single to 1500 rc=$?"; grep -i "trained to" "$OUT/train_single.log" | cut -c1-200
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  for tool in memcheck initcheck; do
    [ -n "$SAN" ] || break
    cp -r "$WORK/run_single" "$WORK/run_$tool"
    FLASHAVATAR_RAST_FWD=split PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout ${SAN_TIMEOUT:-100} $SAN --tool $tool \
      --print-limit 6 $T --out "$WORK/run_$tool" --set train.iterations=1503 --set train.cuda_graph=false \
      --set train.eval_frames=4 >"$OUT/sanitizer_$tool.log" 2>&1
    el "sanitizer $tool rc=$?"; grep -m 30 -A10 "=====" "$OUT/sanitizer_$tool.log" | head -40 | cut -c1-200
    tail -3 "$OUT/sanitizer_$tool.log" | cut -c1-200
  done
  wait $PYTEST; el "pytest rc=$?"; tail -2 "$OUT/pytest_all.log"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_all.log" | head
  e2e single 1 16 64
  e2e split 1
elif [ "${1:-fwd}" = confirm ]; then
  DATA="$WORK/synth_300x512"
  python3 -m flashavatar.cli synth "$DATA" --frames 300 --size 512 >/tmp/synth.log 2>&1 &
  SYNTH=$!
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests >"$OUT/pytest_all.log" 2>&1
  el "pytest rc=$?"; tail -2 "$OUT/pytest_all.log"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_all.log" | head
  wait $SYNTH; el "synth rc=$?"
  T="python3 -X faulthandler -m flashavatar.cli train --data $DATA --subject synthetic --preset gpu --no-progress
     --set data.n_test=100 --set train.tensorboard=false"
  timeout ${TRAIN_TIMEOUT:-200} $T --out "$WORK/run_plain" --set train.iterations=${TRAIN_ITS:-8000} \
    --set train.eval_every=2000 >"$OUT/train_plain.log" 2>&1 &
  P1=$!
  timeout ${TRAIN_TIMEOUT:-200} $T --out "$WORK/run_c192" --set model.uv_size=192 --set model.color_offset=0.2 \
    --set train.iterations=6000 --set train.eval_every=2000 >"$OUT/train_c192.log" 2>&1 &
  P2=$!
  wait $P1; el "train plain rc=$?"; wait $P2; el "train c192 rc=$?"
  for r in plain c192; do
    echo "== $r"; grep -v "^INFO flashavatar.rasterize" "$OUT/train_$r.log" | grep -v "captured the step" | tail -8 | cut -c1-250
  done
  RUN_DIR="$WORK/run_plain" e2e split 1 16 64
  RUN_DIR="$WORK/run_plain" e2e single 1
  timeout 150 python3 benchmarks/bench_rasterize.py --quick --no-gsplat --sizes 15000,50000 --out "$OUT/rasterize.json" 2>&1 \
    | grep -v "Warning\|_warn_once\|^{" >"$OUT/rasterize.log"; el raster; tail -25 "$OUT/rasterize.log"
  rm -f "$OUT/e2e_trained_single.log"  # at most ~8 files come back
elif [ "${1:-fwd}" = fwd ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_rasterize_cuda.py tests/test_rasterize.py \
    tests/test_fast_path.py >"$OUT/pytest_raster.log" 2>&1; el "pytest rc=$?"; tail -2 "$OUT/pytest_raster.log"
  grep -E "^(FAILED|ERROR)" "$OUT/pytest_raster.log" | head
  timeout 150 python3 benchmarks/bench_rasterize.py --quick --no-gsplat --sizes 15000,50000 --out "$OUT/rasterize.json" 2>&1 \
    | grep -v "Warning\|_warn_once\|^{" >"$OUT/rasterize.log"; el raster; tail -25 "$OUT/rasterize.log"
  e2e split 1 16 64
  e2e single 1
else
  DATA="$WORK/synth_300x512"
  [ -d "$DATA/synthetic" ] || python3 -m flashavatar.cli synth "$DATA" --frames 300 --size 512 >"$OUT/synth.log" 2>&1
  el synth
  train() {  # name, extra words
    # shellcheck disable=SC2086
    timeout ${TRAIN_TIMEOUT:-150} python3 -m flashavatar.cli train --data "$DATA" --subject synthetic --out "$WORK/run_$1" \
      --preset gpu --no-progress --set data.n_test=100 --set train.tensorboard=false $2 2>&1 \
      | grep -v "^INFO flashavatar.rasterize" >"$OUT/train_$1.log"
    el "train $1 rc=$?"; grep -i "trained to\|error\|test (32" "$OUT/train_$1.log" | cut -c1-250 | head -5
  }
  [ -n "${REPRO_SET:-}" ] && train repro "$REPRO_SET"
  train plain "--set train.iterations=${TRAIN_ITS:-8000} --set train.eval_every=2000"
  RUN_DIR="$WORK/run_plain" e2e split 1 16 64
  RUN_DIR="$WORK/run_plain" e2e single 1
  timeout ${TEST_TIMEOUT:-220} python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests >"$OUT/pytest_all.log" 2>&1
  el "pytest rc=$?"; tail -2 "$OUT/pytest_all.log"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_all.log" | head
fi
el total
