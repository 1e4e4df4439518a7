#!/usr/bin/env bash
# Device calls of the sixth session (2026-12-03): the pruned auction scans of emd (csrc/emd: objects in kd order,
# blocks of 32 skipped on a lower bound); `final` again in the seventh (lone-bidder eviction chains, small rounds
# settled in one warp). From the repository root; logs to $OUT. Carry .whl (POT, geomloss).
#   emd   build; the EMD tests (CPU and CUDA); the kernel's cycle split at B = 1 (FLASHAVATAR_EMD_PROFILE=1, the
#         benchmark's points); bench_emd.py (N = 1024-8192, B = 1/8/16, POT up to 4,096, geomloss)
#   all   build; the whole test suite
#   final build; the EMD tests, the cycle split and bench_emd.py as in `emd`, then the whole test suite
#   eps   after kEpsFactor 5 -> 7 (auction.h): build; the CUDA EMD tests; bench_emd.py at N = 2048 / 4096,
#         B = 1 / 16 (a short call: the session's device time was nearly spent)
set -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_setup.sh  # OUT, WORK, environment, peer wheels, `el`, build
MODE=${1:-emd}
if [ "$MODE" = emd ] || [ "$MODE" = final ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_emd_cuda.py tests/test_emd.py \
    >"$OUT/pytest_emd.log" 2>&1
  el "pytest emd rc=$?"; tail -1 "$OUT/pytest_emd.log"; grep -E "^(FAILED|ERROR)|Error" "$OUT/pytest_emd.log" | head -8
  FLASHAVATAR_EMD_PROFILE=1 timeout 90 python3 - >"$OUT/emd_profile.log" 2>&1 <<'PY'
import sys, torch
sys.path.insert(0, "benchmarks")
from bench_emd import make_points
from flashavatar import ops
for n in (1024, 2048, 4096, 8192):
    x, y = make_points(1, n)
    ops.emd(x.cuda(), y.cuda())  # warm-up
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    r = ops.emd(x.cuda(), y.cuda(), return_info=True)
    end.record()
    torch.cuda.synchronize()
    print(f"n {n} B 1: {start.elapsed_time(end):.2f} ms, rounds {r.iterations.item()}, converged {r.converged.item()}",
          flush=True)
PY
  el "profile rc=$?"; cat "$OUT/emd_profile.log" | cut -c1-400
  timeout 300 python3 benchmarks/bench_emd.py --budget-s 150 --out "$OUT/emd_h200.json" >"$OUT/emd_h200.log" 2>&1
  el "bench rc=$?"; grep -v "^\[" "$OUT/emd_h200.log" | tail -24
fi
if [ "$MODE" = eps ]; then
  timeout 70 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_emd_cuda.py >"$OUT/pytest_emd_cuda.log" 2>&1
  el "pytest emd cuda rc=$?"; tail -1 "$OUT/pytest_emd_cuda.log"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_emd_cuda.log" | head -8
  timeout 80 python3 benchmarks/bench_emd.py --sizes 2048 4096 --batches 1 16 --budget-s 40 \
    --out "$OUT/emd_h200_eps7.json" >"$OUT/emd_h200_eps7.log" 2>&1
  el "bench rc=$?"; grep -E "^ *[0-9]+ +[0-9]+ \|" "$OUT/emd_h200_eps7.log"
fi
if [ "$MODE" = all ] || [ "$MODE" = final ]; then
  timeout ${TEST_TIMEOUT:-380} python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests >"$OUT/pytest_all.log" 2>&1
  el "pytest rc=$?"; tail -2 "$OUT/pytest_all.log"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_all.log" | head
fi
