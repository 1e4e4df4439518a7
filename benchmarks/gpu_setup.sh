# Shared set-up of the device scripts (sourced from the repository root by gpu_run_fwd_split.sh and
# gpu_run_tile_visit.sh): OUT and WORK folders, the environment, the carried peer wheels (.whl/: the device cannot
# download), a timer `el` that prefixes a message with the seconds since the start, and the extension build
# (skipped when flashavatar/_C*.so is already there from an earlier call on a warm machine).
OUT=${OUT:-/tmp/out}; WORK=${WORK:-/tmp/fa_train}; mkdir -p "$OUT" "$WORK"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >/dev/null 2>&1 && export PYTHONPATH=$PWD:/tmp/site
fi
t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
nvidia-smi --query-gpu=name --format=csv,noheader
if ! ls flashavatar/_C*.so >/dev/null 2>&1; then
  MAX_JOBS=16 FORCE_CUDA=1 python3 setup.py -q build_ext --inplace >/tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
  el build
fi
