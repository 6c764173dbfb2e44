"""A run's forward (dP/dD_0) and reverse (grad P) derivative: in two programs, as before session 18, and in the one
program of `sensitivity.derivatives_fn` (what `mdsens run --wrt --grad` compiles now), each after one cache clear,
alternating in one process (2D bidisperse, seed 0, warm programs). ORD=amd|geometric|metis|auto picks
`sparse.ORDERING`; the relaxed state is kept in /tmp for the next call.

    ORD=auto python bench/derivative_programs.py N [REPEATS]

(session 18: N = 1024 separate 4.9-5.6 ms, one program 4.5-4.8 ms, relaxation 0.124 s; N = 16384 69-74 against
65-71 ms, relaxation 2.98 s; the geometric ordering there 68-77 ms.)
"""
import sys, time, statistics, os
import numpy as np, jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
from mdsens import systems, sparse, observables, job as _job, bench, sensitivity
n = int(sys.argv[1]); reps = int(sys.argv[2]) if len(sys.argv) > 2 else 9; sparse.ORDERING = os.environ.get("ORD", "auto")
fam = systems.get("bidisperse")
system = fam.build_fn(seed=0, **fam.resolve({"n": str(n), "dim": "2"}))
params = {k: jnp.asarray(v) for k, v in system.params.items()}
cache = f"/tmp/mdsens-derivative-programs-x{n}.npz"
if os.path.exists(cache):
    z = np.load(cache); x = jnp.asarray(z["x"]); pairs = jnp.asarray(z["pairs"]); trel = float(z["trel"])
else:
    relax = bench._relax_fn({"max_steps": 200000}, system, 1e-10)
    x0 = jnp.asarray(system.positions)
    x, info, c, pairs = relax(x0, params)
    t0=time.perf_counter(); x, info, c, pairs = relax(x0, params); jax.block_until_ready(x); trel=time.perf_counter()-t0-c
    np.savez(cache, x=np.asarray(x), pairs=np.asarray(pairs), trel=trel)
print("relax", trel)
q = system.to_solver(x, params)
rattler = _job.run_compiled(system, pairs, "rattlers", lambda s_: lambda q_, p_: observables.rattlers(s_, q_, p_), q, params)[0]
job = _job.Job(rtol=1e-10, solver="sparse", preconditioner="twolevel")
solve_of = lambda s_, q_, p_, r_: _job._solver(job, s_, q_, p_, r_)
options = (job.solver, job.rtol, job.preconditioner)
g, _ = bench._gradient_fn(system, pairs, solve_of, options, q, params, rattler)
def mk(s_):
    def f(q_, p_, r_):
        return sensitivity.forward_fn(s_, "diameter", {"pressure": observables.pressure}, r_, solve_of(s_, q_, p_, r_), (0,))(q_, p_)
    return f
f, _ = _job.compiled(system, pairs, ("bench forward", options), mk, q, params, rattler)
def mkb(s_):
    def fb(q_, p_, r_):
        return sensitivity.derivatives_fn(s_, {"pressure": observables.pressure}, [("d0", "diameter", (0,))], ["pressure"], r_, solve_of(s_, q_, p_, r_))(q_, p_)
    return fb
b, _ = _job.compiled(system, pairs, ("bench both", options), mkb, q, params, rattler)
S=[];B=[]
for r in range(reps):
    sparse.clear_cache()
    t0 = time.perf_counter(); o1=jax.block_until_ready(f(q, params, rattler)); o2=jax.block_until_ready(g(q, params, rattler)); t1 = time.perf_counter()
    sparse.clear_cache(); st=dict(sparse.STATS)
    t2 = time.perf_counter(); o3=jax.block_until_ready(b(q, params, rattler)); t3 = time.perf_counter()
    S.append(t1-t0); B.append(t3-t2)
    fz = sparse.STATS["factorizations"]-st["factorizations"]
print(f"separate {statistics.median(S)*1e3:.2f} ms  fused {statistics.median(B)*1e3:.2f} ms  share sep {statistics.median(S)/trel*100:.2f}% fused {statistics.median(B)/trel*100:.2f}%  factorizations in fused {fz}")
print("agree", float(o1.values["pressure"]), float(o3[0]["d0"].values["pressure"]), float(jnp.max(jnp.abs(o2[0]["diameter"]-o3[1]["pressure"][0]["diameter"]))))
