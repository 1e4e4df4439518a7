#!/usr/bin/env bash
# Device calls for issue 6 item 4 (training speed and time to the PSNR bar). Run from the repository root (or a
# copy of it); logs and JSON go to $OUT. Two stages, each well inside one 10-minute call:
#
#   benchmarks/gpu_run_train.sh step    build (unless built), the training tests (CPU + CUDA), then
#                                       bench_train_step.py: eager vs CUDA-graph steps, gpu preset, 512x512
#   benchmarks/gpu_run_train.sh train   synthesise the subject, train the gpu preset with a time cap
#                                       (TRAIN_MINUTES, default 3), evaluating every 500 iterations, then render
#                                       the whole test split (metrics only) for the official head PSNR/SSIM
#
# Env: OUT, FRAMES (300), SIZE (512), N_TEST (100), TRAIN_MINUTES (3), TRAIN_SET (extra "--set k=v" words),
# TRAIN_RUNS (several runs: "name:--set k=v ...;name2:..."),
# BENCH_ARGS (extra bench_train_step.py arguments), WORK (scratch, default /tmp/fa_train),
# PARALLEL=1 (train the TRAIN_RUNS concurrently; quality only, not speed),
# BENCH_TRAINED=1 (after each run, `flashavatar bench` on the trained avatar: bf16, batches 1/16/64, our rasteriser).
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
WORK=${WORK:-/tmp/fa_train}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
t0=$(date +%s)
stage=${1:-step}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
if ! ls flashavatar/_C*.so >/dev/null 2>&1 || [ "$stage" = step ]; then
  MAX_JOBS=${MAX_JOBS:-8} python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 ))s"
fi

if [ "$stage" = step ]; then
  python3 -m pytest tests/test_train_cuda.py tests/test_train.py tests/test_bench_train_step.py -q \
    -p no:cacheprovider 2>&1 | tee "$OUT/pytest_train.log" | tail -15
  echo "tests done: $(( $(date +%s) - t0 ))s"
  python3 benchmarks/bench_train_step.py --data "$WORK" --out "$OUT" ${BENCH_ARGS:-} 2>&1 \
    | grep -v "USDT\|DeviceProperties" | tee "$OUT/bench_train_step.log"
elif [ "$stage" = train ]; then
  FRAMES=${FRAMES:-300} SIZE=${SIZE:-512} N_TEST=${N_TEST:-100}
  DATA="$WORK/synth_${FRAMES}x${SIZE}"
  [ -d "$DATA/synthetic" ] || python3 -m flashavatar.cli synth "$DATA" --frames "$FRAMES" --size "$SIZE" \
    >"$OUT/synth.log" 2>&1 || { tail -20 "$OUT/synth.log"; exit 1; }
  echo "subject ready: $(( $(date +%s) - t0 ))s"
  # TRAIN_RUNS: runs one after another, "name:extra --set words" separated by ";" (default: one run, the preset);
  # PARALLEL=1 trains them at the same time on the one GPU (for quality comparisons only: they share the GPU,
  # so their iterations/s and time to the bar are not the solo figures), then reports each in turn
  IFS=';' read -ra RUNS <<<"${TRAIN_RUNS:-gpu:${TRAIN_SET:-}}"
  train_one() {  # name, extra words
    local name=$1 extra=$2 RUN="$WORK/run_$1"
    rm -rf "$RUN"
    # shellcheck disable=SC2086
    python3 -m flashavatar.cli train --data "$DATA" --subject synthetic --out "$RUN" --preset gpu --no-progress \
      --set data.n_test="$N_TEST" --set train.max_minutes="${TRAIN_MINUTES:-3}" --set train.tensorboard=false \
      $extra 2>&1 | grep -v "^INFO flashavatar.rasterize" >"$OUT/train_$name.log"
  }
  report_one() {  # name
    local name=$1 RUN="$WORK/run_$1"
    tail -4 "$OUT/train_$name.log"
    cp "$RUN/train_summary.json" "$OUT/train_summary_$name.json" 2>/dev/null
    python3 - "$RUN/train_summary.json" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
print("train seconds | iteration | head PSNR | head SSIM | full PSNR")
for e in s["evals"][::4] + s["evals"][-1:]:
    print(f"{e['train_seconds']:13.1f} | {e['iteration']:9d} | {e['test_psnr_head']:9.2f} | "
          f"{e['test_ssim_head']:9.4f} | {e['test_psnr_full']:9.2f}")
best = max(s["evals"], key=lambda e: e["test_psnr_head"])
print(f"best head PSNR {best['test_psnr_head']:.2f} at iteration {best['iteration']} ({best['train_seconds']:.1f} s)")
print("time to bar:", s["time_to_bar"], "| it/s (wall, this call):", s["it_per_s"], "|", s["cuda_graph"])
PYEOF
    python3 -m flashavatar.cli render --run "$RUN" --out "$WORK/eval_$name" --no-frames --no-video 2>&1 \
      | grep -v "render:" >"$OUT/render_$name.log"; grep "test split" "$OUT/render_$name.log"
    if [ -n "${BENCH_TRAINED:-}" ]; then
      timeout 200 python3 -m flashavatar.cli bench --run "$RUN" --dtypes bf16 --batch-sizes 1 16 64 --no-gsplat \
        --out "$OUT/end_to_end_trained_$name.json" 2>&1 | grep -v "Warning\|warn" >"$OUT/bench_trained_$name.log"
      grep -i "graph\|fps" "$OUT/bench_trained_$name.log" | head -20
    fi
  }
  for spec in "${RUNS[@]}"; do
    name=${spec%%:*}; extra=${spec#*:}
    echo "== run $name: ${extra:-gpu preset}"
    if [ -n "${PARALLEL:-}" ]; then
      train_one "$name" "$extra" &
    else
      train_one "$name" "$extra"; report_one "$name"
    fi
  done
  if [ -n "${PARALLEL:-}" ]; then
    wait
    echo "parallel training done: $(( $(date +%s) - t0 ))s"
    for spec in "${RUNS[@]}"; do echo "== report ${spec%%:*}"; report_one "${spec%%:*}"; done
  fi
fi
echo "total: $(( $(date +%s) - t0 ))s"
