#!/usr/bin/env bash
# The lead's one device call: build, the whole test suite (GPU tests included), benchmarks. Logs + JSON -> $OUT.
# Run from the repository root with `.whl` carried (gsplat 1.5.3, pot, geomloss, plyfile wheels):
#   bash tools/gpu_all.sh            # everything
#   SKIP_BENCH="emd" bash tools/gpu_all.sh
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/tmp/pip.log 2>&1 || { echo "pip install of carried wheels failed"; tail -5 /tmp/pip.log; }
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 
# gsplat JIT-compiles its CUDA on first import: start it now, in the background.
(MAX_JOBS=8 python3 -c "from gsplat.cuda._backend import _C; print('gsplat built', _C is not None)" \
  >/tmp/gsplat_build.log 2>&1 &)
t0=$(date +%s)
MAX_JOBS=8 python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 ))s"
python3 -m pytest tests -q -p no:cacheprovider -n 8 -rs 2>&1 | tee "$OUT/pytest_all.log" | grep -v "^SKIPPED.*needs a CUDA" | tail -15
for i in $(seq 1 60); do grep -q "gsplat built\|Error" /tmp/gsplat_build.log && break; sleep 5; done
tail -1 /tmp/gsplat_build.log
case " ${SKIP_BENCH:-} " in *" raster "*) ;; *)
  timeout 200 python3 benchmarks/bench_rasterize.py --quick --out "$OUT/bench_rasterize.json" 2>&1 \
    | tee "$OUT/bench_rasterize.log" | grep -v '^{' | tail -14 ;; esac
case " ${SKIP_BENCH:-} " in *" e2e "*) ;; *)
  timeout 200 python3 benchmarks/bench_end_to_end.py --out "$OUT" ${E2E_ARGS:-} 2>&1 | tee "$OUT/bench_e2e.log" | tail -30 ;; esac
case " ${SKIP_BENCH:-} " in *" emd "*) ;; *)
  timeout 200 python3 benchmarks/bench_emd.py --sizes 1024 2048 4096 --batches 1 16 --pot-max-n 2048 \
    --out "$OUT/bench_emd.json" 2>&1 | tee "$OUT/bench_emd.log" | tail -12 ;; esac
