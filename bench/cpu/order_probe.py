"""Force, table build and pair-list cost of one random start, in its random particle order and renumbered in cell order.

    python bench/cpu/order_probe.py N

Minimum of 15 calls each (CPU); the evidence for sorting particles spatially at large N (README, N = 131072).
"""
import sys, time, jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
from mdsens import systems, relax
n = int(sys.argv[1])
s = systems.get("bidisperse").build(n=n, phi=0.9, seed=0)
p = {k: jnp.asarray(v) for k, v in s.params.items()}
p["alpha"] = 2.0
x = jnp.mod(jnp.asarray(s.positions), p["box"])
def t(fn, *a, r=15):
    jax.block_until_ready(fn(*a)); ts=[]
    for _ in range(r):
        t0=time.perf_counter(); jax.block_until_ready(fn(*a)); ts.append(time.perf_counter()-t0)
    return np.min(ts)*1e3
f = relax.pair_list_force_fn(s)
force = jax.jit(lambda x, pl: f(x, pl, p))
table = relax.Table(s, p, 0.3)
cell = np.asarray(table._cell_of(x))
perm = np.argsort(cell, kind="stable")
for label, xx in [("random order", x), ("cell order", x[perm])]:
    tb = relax.Table(s, p, 0.3)
    K, C = tb.capacities(xx); P = tb.pair_capacity(xx, C)
    build = jax.jit(lambda y: tb.build(y, K, C))
    nb = build(xx); pl = relax.pair_list(nb.idx, n, P)
    plf = jax.jit(lambda idx: relax.pair_list(idx, n, P))
    print(label, "K", K, "force %.2f ms" % t(force, xx, pl), "build %.1f ms" % t(build, xx), "pair list %.1f ms" % t(plf, nb.idx), flush=True)
