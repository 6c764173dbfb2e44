"""CG iterations of the fixed-pressure derivatives with and without the preconditioner.

    python bench/pressure/cg.py N BOX_DOF      (e.g. 1024 shear)

Relaxes one 2D bidisperse packing at P = 0.01 (seed 0), then solves the forward
derivatives in both diameters and in the pressure with CG (rtol 1e-10) preconditioned
by none, jacobi and twolevel (``barostat.solver_for``), printing the iterations, the
solve's wall time and the largest difference of dx*/dθ from the unpreconditioned one.
"""

import sys
import time

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

from mdsens import barostat, observables  # noqa: E402
from mdsens.systems import get  # noqa: E402

n, dof = int(sys.argv[1]), sys.argv[2]
system = get("bidisperse").build(n=n, pressure=0.01, box_dof=dof, seed=0)
t = time.time()
out = barostat.relax(system)
print(f"N={n} {dof}: relaxed {int(out.info.steps)} steps in {time.time() - t:.1f} s", flush=True)
s = system.with_pairs(jnp.asarray(out.pairs))
q, params = out.q, out.params
rattler = jax.jit(observables.rattlers, static_argnums=0)(s, q, params)
reference = {}
for kind in ("none", "jacobi", "twolevel"):
    row = {}
    for name in ("diameter", "pressure"):
        def forward(q_, p_, name=name, kind=kind):
            solve = barostat.solver_for(s, q_, p_, rattler, "cg", 1e-10, kind)
            observe = {"packing_fraction": observables.packing_fraction}
            return barostat.forward_fn(s, name, observe, rattler, solve)(q_, p_)

        compiled = jax.jit(forward).lower(q, params).compile()
        t = time.time()
        result = jax.block_until_ready(compiled(q, params))
        elapsed = time.time() - t
        position = np.asarray(result.values["position"])
        reference.setdefault(name, position)
        error = np.max(np.abs(position - reference[name])) / np.max(np.abs(reference[name]))
        row[name] = (np.asarray(result.iterations).ravel().tolist(), round(elapsed, 3), float(error))
    print(kind, row, flush=True)
