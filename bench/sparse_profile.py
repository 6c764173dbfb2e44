"""The sparse derivative of a run, timed by part: forward (dP/dD_0, one tangent) and reverse (the gradient of P) after one
cache clear, with the factorization (SuperLU or CHOLMOD), the whole `_Factor`, the solves and the host callback timed
inside (2D bidisperse, seed 0; warm programs).

    python bench/sparse_profile.py N [REPEATS [BACKEND]]      (BACKEND: auto (default), cholmod or superlu)

Each repeat also times the two in one program after another clear (`sensitivity.derivatives_fn`, what `mdsens run
--wrt --grad` compiles since session 18; session 18: N = 1024 4.5-4.8 against 4.9-5.6 ms in two programs, relaxation
0.124 s; N = 16384 65-71 against 69-74 ms, relaxation 2.98 s).

(2026-11-28, N = 16384, SuperLU: forward 0.21-0.27 s, SuperLU 0.165 s of it, reverse 0.02 s; relaxation 3.8 s.
Session 11, CHOLMOD: forward 0.10-0.14 s, `_Factor` 0.085-0.12 s of it, reverse 0.015-0.02 s; relaxation 3.9 s.)
"""
import sys, time, statistics, numpy as np, jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
from mdsens import systems, sparse, observables, job as _job, bench
import scipy.sparse.linalg as spla, scipy.sparse as sp
n = int(sys.argv[1])
fam = systems.get("bidisperse")
system = fam.build_fn(seed=0, **fam.resolve({"n": str(n), "dim": "2"}))
params = {k: jnp.asarray(v) for k, v in system.params.items()}
relax = bench._relax_fn({"max_steps": 200000}, system, 1e-10)
x0 = jnp.asarray(system.positions)
x, info, c, pairs = relax(x0, params)
t0=time.perf_counter(); x, info, c, pairs = relax(x0, params); jax.block_until_ready(x); trel=time.perf_counter()-t0-c
print("relax", trel, "steps", int(info.steps))
q = system.to_solver(x, params)
# instrument _Factor
orig_splu = spla.splu
T = {}
def splu(*a, **k):
    t0 = time.perf_counter(); r = orig_splu(*a, **k); T.setdefault("splu", []).append(time.perf_counter()-t0); return r
spla.splu = splu
if len(sys.argv) > 3:
    sparse.BACKEND = sys.argv[3]
orig_chol = sparse._cholesky
def chol(*a):
    t0 = time.perf_counter(); r = orig_chol(*a); T.setdefault("cholmod", []).append(time.perf_counter()-t0); return r
sparse._cholesky = chol
orig_init = sparse._Factor.__init__
def init(self, *a):
    t0 = time.perf_counter(); orig_init(self, *a); T.setdefault("factor_total", []).append(time.perf_counter()-t0)
sparse._Factor.__init__ = init
orig_solve = sparse._Factor.solve
def solve(self, rows):
    t0 = time.perf_counter(); r = orig_solve(self, rows); T.setdefault("solve", []).append(time.perf_counter()-t0); return r
sparse._Factor.solve = solve
orig_host = sparse._host_solve
def host(*a):
    t0 = time.perf_counter(); r = orig_host(*a); T.setdefault("host_total", []).append(time.perf_counter()-t0); return r
sparse._host_solve = host
rattler = _job.run_compiled(system, pairs, "rattlers", lambda s_: lambda q_, p_: observables.rattlers(s_, q_, p_), q, params)[0]
from mdsens import sensitivity
job = _job.Job(rtol=1e-10, solver="sparse", preconditioner="twolevel")
solve_of = lambda s_, q_, p_, r_: _job._solver(job, s_, q_, p_, r_)
options = (job.solver, job.rtol, job.preconditioner)
g, _ = bench._gradient_fn(system, pairs, solve_of, options, q, params, rattler)
def mk(s_):
    def f(q_, p_, r_):
        return sensitivity.forward_fn(s_, "diameter", {"pressure": observables.pressure}, r_, solve_of(s_, q_, p_, r_), (0,))(q_, p_)
    return f
f, _ = _job.compiled(system, pairs, ("bench forward", options), mk, q, params, rattler)
def mk_both(s_):  # what a run compiles since session 18: both derivatives in one program
    def fb(q_, p_, r_):
        return sensitivity.derivatives_fn(s_, {"pressure": observables.pressure}, [("d0", "diameter", (0,))],
                                          ["pressure"], r_, solve_of(s_, q_, p_, r_))(q_, p_)
    return fb
both, _ = _job.compiled(system, pairs, ("bench both", options), mk_both, q, params, rattler)
for r in range(int(sys.argv[2]) if len(sys.argv) > 2 else 5):
    T.clear()
    sparse.clear_cache()
    t0 = time.perf_counter(); jax.block_until_ready(f(q, params, rattler)); t1 = time.perf_counter(); jax.block_until_ready(g(q, params, rattler)); t2 = time.perf_counter()
    sparse.clear_cache()
    t3 = time.perf_counter(); jax.block_until_ready(both(q, params, rattler)); t4 = time.perf_counter()
    print(f"fwd {t1-t0:.4f} rev {t2-t1:.4f} shared/relax {(t2-t0)/trel:.4f} one program {t4-t3:.4f} ({(t4-t3)/trel:.4f})",
          {k: [round(v,4) for v in vs] for k, vs in T.items()})
