"""Where the sparse derivative's time goes: SuperLU with its ordering, given the ordering, in
float32, and the triangular solves, on the Hessian at x* (2D bidisperse, seed 0).

    python bench/sparse_lu_probe.py N

Prints the fill and the best of three timings of each (2026-11-28, N = 16384: splu 0.146 s,
0.122 s with the ordering given, 0.107 s in float32, 0.086 s with both; the relaxation 3.8 s).
"""
import sys, time, numpy as np, jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import scipy.sparse as sp, scipy.sparse.linalg as spla
from mdsens import systems, sparse, observables, job as _job, relax as R
n = int(sys.argv[1])
fam = systems.get("bidisperse")
system = fam.build_fn(seed=0, **fam.resolve({"n": str(n), "dim": "2"}))
params = {k: jnp.asarray(v) for k, v in system.params.items()}
out = R.relax(system, params, jnp.asarray(system.positions), "fire", 1e-10, 200000, 2000)
q = system.to_solver(out.x, params); pairs = jnp.asarray(R.pairs_from_table(out.idx, system.n))
rattler = np.asarray(_job.run_compiled(system, pairs, "rattlers", lambda s_: lambda q_, p_: observables.rattlers(s_, q_, p_), q, params)[0])
held = ~rattler
k, i, j = jax.jit(lambda pr, q_, p_: system.model.template.with_pairs(pr).pair_hessians(q_, p_))(pairs, q, params)
k, i, j = map(np.asarray, (k, i, j))
d=2; modes = np.zeros((n, d, d))
for a in range(d): modes[:, a, a] = held
T={}
def tm(name, f, reps=3):
    ts=[]; 
    for _ in range(reps):
        t0=time.perf_counter(); r=f(); ts.append(time.perf_counter()-t0)
    T[name]=min(ts); return r
F = tm("Factor_total", lambda: sparse._Factor(k, i, j, held, modes))
a = F.a; size=a.shape[0]
g = (a + sp.eye(size)*1e-3*abs(a.diagonal()).mean()).tocsc()
lu = tm("splu_mmd64", lambda: spla.splu(g, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True}))
p = np.argsort(lu.perm_c)
gp = g[p][:, p].tocsc()
chk = spla.splu(gp, permc_spec="NATURAL", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
print("fill mmd", lu.L.nnz + lu.U.nnz, "fill prepermuted", chk.L.nnz + chk.U.nnz, flush=True)
tm("splu_natural_prepermuted64", lambda: spla.splu(gp, permc_spec="NATURAL", diag_pivot_thresh=0.0, options={"SymmetricMode": True}))
g32 = g.astype(np.float32)
lu32 = tm("splu_mmd32", lambda: spla.splu(g32, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True}))
tm("splu_natural_prepermuted32", lambda: spla.splu(gp.astype(np.float32), permc_spec="NATURAL", diag_pivot_thresh=0.0, options={"SymmetricMode": True}))
b = np.random.default_rng(0).standard_normal((size, 2))
tm("solve64", lambda: lu.solve(b)); tm("solve32", lambda: lu32.solve(b.astype(np.float32)))
print(n, "nnz", a.nnz, "fill L+U", lu.L.nnz + lu.U.nnz, {k_: round(v, 4) for k_, v in T.items()}, flush=True)
