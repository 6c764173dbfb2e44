"""Where a fixed-box relaxation's time goes: each compiled chunk timed, then a least-squares
fit of chunk time = a · steps + b · rebuilds (the first chunk, which also sizes the table,
left out of the fit). 2D bidisperse φ = 0.9, seed 0.

    python bench/rebuild_share.py N CHUNK

Chunk length does not change the trajectory (the same steps and energy). Session 11,
2026-11-28: N = 16384 (CHUNK 250): 0.37 ms a step, 7.0 ms a rebuild (168), rebuilds ~30 %
of 3.9 s; N = 131072 (CHUNK 1000): 3.48 ms a step, 60 ms a rebuild (363, 232 of them in the
first 3300 steps), rebuilds ~21 % of 104 s. Session 12 (rebuild test without argmax, FIRE's power
without vdot): N = 131072, the same 22394 steps and 363 rebuilds, 2.93 ms a step, 91.6 s.
"""
import os, sys, time, numpy as np, jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
from mdsens import systems, relax as R, driver
n = int(sys.argv[1]); chunk = int(sys.argv[2])
rec = []
orig = driver.drive
def drive(state, table, program, *a, **k):
    def prog(state, table, until, stale):
        run, seconds = program(state, table, until, stale)
        def timed(state, table, until, stale):
            s0 = int(state.step); t0 = time.perf_counter(); rep = run(state, table, until, stale)
            jax.block_until_ready(rep.state.x); t = time.perf_counter() - t0
            rec.append((int(rep.step) - s0, int(rep.rebuilds), t, bool(rep.overflow)))
            return rep
        return timed, seconds
    return orig(state, table, prog, *a, **k)
R.driver.drive = drive
fam = systems.get("bidisperse")
system = fam.build_fn(seed=0, **fam.resolve({"n": str(n), "dim": os.environ.get("DIM", "2")}))
params = {k: jnp.asarray(v) for k, v in system.params.items()}
md = float(os.environ["MAXDISP"]) if os.environ.get("MAXDISP") else None
out = R.relax(system, params, jnp.asarray(system.positions), "fire", 1e-10, 400000, chunk, max_displacement=md,
              skin=float(os.environ.get("SKIN", R.DEFAULT_SKIN)))
print("steps", int(out.info.steps), "rebuilds", out.stats.rebuilds, "E %.15g" % float(out.info.energy))
r = np.array([(s, b, t) for s, b, t, o in rec if not o and s > 0], float)
# skip the first chunk (compile-time effects / settle) in the fit
A = r[1:, :2]; y = r[1:, 2]
coef, *_ = np.linalg.lstsq(A, y, rcond=None)
print("chunks", len(r), "total time %.2f s" % r[:, 2].sum(), "fit: per step %.3f ms, per rebuild %.1f ms" % (coef[0]*1e3, coef[1]*1e3))
print("rebuild share %.1f %%" % (100 * coef[1] * r[:, 1].sum() / r[:, 2].sum()))
for s, b, t in r[:6]: print("  chunk steps", int(s), "rebuilds", int(b), "time %.3f" % t)
