"""The sparse direct solve against CG + twolevel, interleaved in one process, medians.

    python bench/sparse_vs_cg.py SYSTEM N DIM REPEATS [OUTDIR]     (OUTDIR: where the JSON goes, default .)

Per repeat: a warm relaxation (the bench's, compile excluded), then the bench's two
derivative programs (forward dP/dD_0 and the reverse gradient of P) with CG and with the
sparse solve: cold (its factorization cache cleared first), warm (the same call again),
and "shared" (forward then reverse after one clear: what `mdsens run --wrt D --grad P`
pays). Ratios are (forward + reverse) / relax.
"""
import os, sys, time, json, statistics, numpy as np, jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
from mdsens import systems, sensitivity, sparse, observables, job as _job, bench
name, n, dim, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
fam = systems.get(name)
system = fam.build_fn(seed=0, **fam.resolve({"n": str(n), "dim": str(dim)}))
params = {k: jnp.asarray(v) for k, v in system.params.items()}
spec = {"max_steps": 200000}
relax = bench._relax_fn(spec, system, 1e-10)
x0 = jnp.asarray(system.positions)
x, info, c, pairs = relax(x0, params)
q = system.to_solver(x, params)
rattler = _job.run_compiled(system, pairs, "rattlers", lambda s_: lambda q_, p_: observables.rattlers(s_, q_, p_),
                            q, params)[0]
print("N", n, "dim", dim, "rattlers", int(rattler.sum()), "steps", int(info.steps), flush=True)
pname = "diameter"
def make(solver):
    job = _job.Job(rtol=1e-10, solver=solver, preconditioner="twolevel")
    solve_of = lambda s_, q_, p_, r_: _job._solver(job, s_, q_, p_, r_)
    options = (job.solver, job.rtol, job.preconditioner)
    g, _ = bench._gradient_fn(system, pairs, solve_of, options, q, params, rattler)
    def mk(s_):
        def f(q_, p_, r_):
            return sensitivity.forward_fn(s_, pname, {"pressure": observables.pressure}, r_, solve_of(s_, q_, p_, r_), (0,))(q_, p_)
        return f
    f, _ = _job.compiled(system, pairs, ("bench forward", options), mk, q, params, rattler)
    return (lambda: g(q, params, rattler)), (lambda: f(q, params, rattler))
rev = {}; fwd = {}
for s in ("cg", "sparse"):
    rev[s], fwd[s] = make(s)
T = {k: [] for k in ["relax", "cg_fwd", "cg_rev", "sp_fwd_cold", "sp_rev_cold", "sp_fwd_warm", "sp_rev_warm", "sp_both_shared"]}
out = {}
def t(f):
    t0 = time.perf_counter(); o = jax.block_until_ready(f()); return time.perf_counter() - t0, o
for r in range(reps):
    dt, o = t(lambda: relax(x0, params)); T["relax"].append(dt - o[2])
    dt, o = t(fwd["cg"]); T["cg_fwd"].append(dt); out["cg_fwd"] = o
    dt, o = t(rev["cg"]); T["cg_rev"].append(dt); out["cg_rev"] = o
    sparse.clear_cache(); dt, o = t(fwd["sparse"]); T["sp_fwd_cold"].append(dt); out["sp_fwd"] = o
    dt, o = t(fwd["sparse"]); T["sp_fwd_warm"].append(dt)
    sparse.clear_cache(); dt, o = t(rev["sparse"]); T["sp_rev_cold"].append(dt); out["sp_rev"] = o
    dt, o = t(rev["sparse"]); T["sp_rev_warm"].append(dt)
    sparse.clear_cache(); t0 = time.perf_counter(); jax.block_until_ready(fwd["sparse"]()); jax.block_until_ready(rev["sparse"]()); T["sp_both_shared"].append(time.perf_counter() - t0)
med = {k: statistics.median(v) for k, v in T.items()}
med["ratio_cg"] = (med["cg_fwd"] + med["cg_rev"]) / med["relax"]
med["ratio_sparse_cold"] = (med["sp_fwd_cold"] + med["sp_rev_cold"]) / med["relax"]
med["ratio_sparse_shared"] = med["sp_both_shared"] / med["relax"]
med["cg_iterations"] = [int(out["cg_fwd"].iterations), int(out["cg_rev"][1].iterations)]
med["fwd_dP_rel_diff"] = float(abs(out["sp_fwd"].values["pressure"] - out["cg_fwd"].values["pressure"]) / abs(out["cg_fwd"].values["pressure"]))
gs, gc = np.asarray(out["sp_rev"][0]["diameter"]), np.asarray(out["cg_rev"][0]["diameter"])
med["rev_rel_diff"] = float(np.max(np.abs(gs - gc)) / np.max(np.abs(gc)))
med["sp_residual"] = [float(out["sp_fwd"].residual), float(out["sp_rev"][1].residual)]
print(json.dumps({"n": n, "dim": dim, "reps": reps, **med}, indent=1), flush=True)
outdir = sys.argv[5] if len(sys.argv) > 5 else "."
os.makedirs(outdir, exist_ok=True)
json.dump({"n": n, "dim": dim, "reps": reps, "samples": T, **med}, open(os.path.join(outdir, f"cmp_{name}_{n}_{dim}d.json"), "w"),
          indent=1)
