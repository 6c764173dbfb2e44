#!/usr/bin/env bash
# mdsens GPU check: install the packed wheels, then run the reference job at three sizes.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  nproc; python3 -c "import jax, mdsens; print('jax', jax.__version__, jax.devices())"
  for spec in ${MDSENS_GPU_RUNS:-16384:float64:100 131072:float64:140 1048576:float64:220}; do
    IFS=: read n prec lim <<< "$spec"
    echo "== N=$n $prec (limit $lim s) $(date +%T)"
    timeout $lim mdsens run bidisperse --set n=$n --device ${MDSENS_GPU_DEVICE:-gpu} --precision $prec \
      --json --quiet --no-cache -o /tmp/n$n$prec.h5 > "$OUT/n$n$prec.json" 2> "$OUT/n$n$prec.err"
    echo "rc=$? $(head -c 400 "$OUT/n$n$prec.json")"; tail -3 "$OUT/n$n$prec.err"
  done
  date +%T
} 2>&1 | tee "$OUT/gpu.log"
