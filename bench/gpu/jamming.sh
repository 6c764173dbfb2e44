#!/usr/bin/env bash
# The jamming ensemble (notebooks/03_jamming.py) on the GPU machine: 2D 50:50 bidisperse 1:1.4
# harmonic disks, N = 128 and 256, 64 seeds per packing fraction; per-member scalars to $OUT/jamming_nN.json.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; DEV=${MDSENS_GPU_DEVICE:-gpu}
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  for n in ${MDSENS_JAM_NS:-128 256}; do
    echo "== N=$n $(date +%T)"
    timeout ${MDSENS_JAM_TIMEOUT:-150} mdsens ensemble bidisperse --set n=$n --seeds ${MDSENS_JAM_SEEDS:-0:64} \
      --sweep phi=${MDSENS_JAM_PHI:-0.843,0.845,0.8475,0.85,0.855,0.86,0.87,0.88,0.90,0.93} --observe pressure --observe bulk_modulus \
      --observe shear_modulus --observe contact_number --observe energy --max-steps 300000 --device $DEV \
      --json -q --force -o /tmp/jam$n.h5 > "$OUT/jam$n.summary.json" 2> "$OUT/jam$n.err"
    echo "rc=$? $(head -c 400 "$OUT/jam$n.summary.json")"; tail -2 "$OUT/jam$n.err"
    python3 - "$n" "$OUT" <<'PY'
import json, sys, numpy as np
from mdsens import ensemble_io
n, out = sys.argv[1], sys.argv[2]
d = ensemble_io.read(f"/tmp/jam{n}.h5")
rows = {"seed": d["seed"], "phi": d["phi"], "converged": d["converged"], "steps": d["steps"],
        "rattlers": d["rattler"].sum(axis=1)}
rows.update({k: v for k, v in d["observables"].items()})
rows.update({f"d{k}/ddiameter": v for k, v in d["sensitivity"]["diameter"].items() if k != "position"})
json.dump({"meta": {k: d["meta"][k] for k in ("command", "versions", "device", "timings", "configuration")},
           "n": int(n), "members": {k: np.asarray(v).tolist() for k, v in rows.items()}}, open(f"{out}/jamming_n{n}.json", "w"))
print("wrote", f"{out}/jamming_n{n}.json")
PY
  done
  date +%T
} 2>&1 | tee "$OUT/gpu.log"
