#!/usr/bin/env bash
# mdsens ensembles on the GPU machine (from the project's root, .gpu/ wheels beside it):
# the ensemble benchmark at N = 128 and 1024 (64 members vs sequential runs), then a large batch.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; DEV=${MDSENS_GPU_DEVICE:-gpu}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  echo "== bench --ensemble $(date +%T)"
  timeout ${MDSENS_BENCH_TIMEOUT:-300} mdsens bench bidisperse --n ${MDSENS_ENS_NS:-128,1024} --ensemble ${MDSENS_ENS_M:-64} \
    --sequential 2 --device $DEV -o "$OUT/ensemble_bench.json" 2> "$OUT/ensemble_bench.err"
  echo "rc=$?"; tail -3 "$OUT/ensemble_bench.err"
  for spec in ${MDSENS_ENS_BIG:-1024:256}; do
    IFS=: read n m <<< "$spec"
    echo "== ensemble N=$n M=$m $(date +%T)"
    timeout ${MDSENS_BIG_TIMEOUT:-150} mdsens ensemble bidisperse --set n=$n --seeds 0:$m --device $DEV --json -q \
      -o /tmp/big$n.h5 > "$OUT/ensemble_n${n}_m$m.json" 2> "$OUT/ensemble_n${n}_m$m.err"
    echo "rc=$? $(head -c 300 "$OUT/ensemble_n${n}_m$m.json")"; tail -2 "$OUT/ensemble_n${n}_m$m.err"
  done
  date +%T
} 2>&1 | tee "$OUT/gpu.log"
