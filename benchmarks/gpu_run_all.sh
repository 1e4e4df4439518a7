#!/usr/bin/env bash
# The device calls of a release check, each well inside one 10-minute call. Run from the repository root (or a
# copy of it) with the carried wheels in .whl/ (gsplat, pot, geomloss, plyfile); logs and JSON go to $OUT.
#
#   benchmarks/gpu_run_all.sh train   build, benchmarks/gpu_run_train.sh train (time to the PSNR bar, 3 minutes);
#                                     gsplat compiles in the background for the next call
#   benchmarks/gpu_run_all.sh tests   build (unless built), the whole test suite (GPU tests included), the
#                                     rasteriser benchmark vs gsplat
#   benchmarks/gpu_run_all.sh speed   build (unless built), the EMD benchmark (POT, geomloss), the end-to-end
#                                     animation benchmark (vs the gsplat pipeline)
#   benchmarks/gpu_run_all.sh step    benchmarks/gpu_run_train.sh step (training tests, eager vs graph steps)
#   benchmarks/gpu_run_all.sh debug   build, a raw op's bad-input error, training steps from iteration 0 with
#                                     CUDA_LAUNCH_BLOCKING=1 (compute-sanitizer when they fail), the test suite
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
t0=$(date +%s)
stage=${1:-tests}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >/dev/null 2>&1 || echo "pip install of carried wheels failed"
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD
fi
elapsed() { echo "$(( $(date +%s) - t0 ))s"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
if ! ls flashavatar/_C*.so >/dev/null 2>&1; then
  MAX_JOBS=${MAX_JOBS:-16} FORCE_CUDA=1 python3 setup.py -q build_ext --inplace >/tmp/build.log 2>&1 \
    || { tail -40 /tmp/build.log; exit 1; }
  echo "build: $(elapsed)"
fi
# gsplat compiles its CUDA on first use (into ~/.cache, kept while the machine stays warm); beside training
# with few jobs and low priority, so that the timed run keeps its cores
[ "$stage" = train ] && GSPLAT_JOBS=${GSPLAT_JOBS:-4}
if [ -z "${NO_GSPLAT:-}" ] && ! grep -q "gsplat built True" /tmp/gsplat_build.log 2>/dev/null; then
  (MAX_JOBS=${GSPLAT_JOBS:-6} nice -n 19 python3 -c "from gsplat.cuda._backend import _C; print('gsplat built', _C is not None)" \
    >/tmp/gsplat_build.log 2>&1 &)
fi
wait_gsplat() {  # at most until $1 seconds after the start
  while [ $(( $(date +%s) - t0 )) -lt "$1" ]; do grep -q "gsplat built\|Error" /tmp/gsplat_build.log && break; sleep 5; done
  grep -q "gsplat built True" /tmp/gsplat_build.log
}

run_tests() {  # the whole suite, its log in $OUT (a killed run still leaves the lines so far)
  timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests >"$OUT/pytest.log" 2>&1
  echo "pytest rc=$? $(elapsed)"; grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30
}
if [ "$stage" = debug ]; then
  grep "flashavatar setup" /tmp/build.log
  timeout 60 python3 -c "
import torch, flashavatar.ops
try:
    torch.ops.flashavatar.gaussian_w2(torch.zeros(4, 3), torch.zeros(4, 3, 2), torch.zeros(4, 3), torch.zeros(4, 3, 2))
except RuntimeError as e:
    print('raw op raised:', str(e).splitlines()[0][:100])
"; echo "raw op rc=$?"
  STEP="benchmarks/bench_train_step.py --data /tmp/fa_step --out /tmp/step --start-iteration 0 --cuda-graph off"
  CUDA_LAUNCH_BLOCKING=1 timeout 150 python3 $STEP --warmup 5 --steps 60 --profile-steps 0 >"$OUT/step0.log" 2>&1
  rc=$?; echo "steps from 0 (launch blocking) rc=$rc $(elapsed)"; grep -v "USDT\|Warning\|warn_once" "$OUT/step0.log" | tail -25
  if [ $rc -ne 0 ]; then
    SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
    [ -n "$SAN" ] && timeout 200 $SAN --tool memcheck --print-limit 4 python3 $STEP --warmup 1 --steps 2 \
      --profile-steps 0 >"$OUT/sanitizer.log" 2>&1; echo "sanitizer rc=$? $(elapsed)"; grep -m 40 -A12 "=====" "$OUT/sanitizer.log" | head -60
  fi
  timeout 120 python3 $STEP --cuda-graph both --warmup 20 --steps 200 --profile-steps 0 2>&1 | grep "it/s\|graph /"
  run_tests
elif [ "$stage" = tests ]; then
  run_tests
  GS="--no-gsplat"; [ -z "${NO_GSPLAT:-}" ] && wait_gsplat 400 && GS=""
  timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_rasterize.py --quick $GS --out "$OUT/rasterize.json" \
    2>&1 | grep -v "Warning\|_warn_once\|^{" | tee "$OUT/rasterize.log" | tail -40
elif [ "$stage" = speed ]; then
  timeout ${EMD_TIMEOUT:-240} python3 benchmarks/bench_emd.py --budget-s 150 --out "$OUT/emd.json" 2>&1 \
    | grep -v "Warning\|warn" | tee "$OUT/emd.log" | tail -30
  echo "emd: $(elapsed)"
  GS="--no-gsplat"; [ -z "${NO_GSPLAT:-}" ] && wait_gsplat 300 && GS=""
  timeout ${E2E_TIMEOUT:-270} python3 benchmarks/bench_end_to_end.py --out "$OUT/end_to_end.json" $GS \
    --max-seconds 180 2>&1 | tee "$OUT/end_to_end.log" | grep -v "^  batch"
  echo "e2e: $(elapsed)"
elif [ "$stage" = step ] || [ "$stage" = train ]; then
  bash benchmarks/gpu_run_train.sh "$stage"
fi
echo "total: $(elapsed)"
