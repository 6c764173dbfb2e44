"""One design step against a warm relaxation plus the moduli (README, "Inverse design"):

    python bench/design_step.py N [phi|pressure]

prints one JSON line: the medians over 20 steps (each perturbed by 1e-4 relative from the
relaxed start) of a warm relaxation, of ν alone (the moduli, one compiled program) and of the
loss with its gradient, and their ratio (relax + loss) / (relax + moduli)."""
import sys, time, json
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np
from mdsens import design, observables
from mdsens.job import Job

n = int(sys.argv[1]); mode = sys.argv[2] if len(sys.argv) > 2 else "phi"
over = {"n": str(n)}
if mode == "pressure":
    over.update(pressure="0.01")
job = Job(system="polydisperse", overrides=over, seed=0)
plan = design.prepare(design.Design(job=job, targets={"poisson_ratio": 0.3}, vary=["diameter"],
                                    keep="phi" if mode == "phi" else "pressure"))
runner = design._PressureRunner(plan) if plan.fixed else design._Runner(plan)
theta = {"diameter": jnp.asarray(plan.base["diameter"])}
params, q, info, pairs, _ = runner.relax(theta, None)
from types import SimpleNamespace
start = SimpleNamespace(q=q, params={k: np.asarray(v) for k, v in params.items()})  # what runner.relax reads of a Step
out = runner.evaluate(q, start.params, theta, pairs)  # compile
# ν alone (the moduli, no gradient), one compiled program on the same arguments
sys_ = plan.system
if plan.fixed:
    from mdsens import barostat
    def nu_only(z, th, pr):
        s = sys_ if pr is None else sys_.with_pairs(pr)
        q_, p_ = barostat.unpack(s, z, design._without_strain(runner.physical(th)))
        return observables.poisson_ratio(s, q_, p_)
else:
    def nu_only(q_, th, pr):
        s = sys_ if pr is None else sys_.with_pairs(pr)
        return observables.poisson_ratio(s, q_, runner.physical(th))
nu_c = jax.jit(nu_only).lower(runner.state(q, start.params), theta, pairs).compile()
rng = np.random.default_rng(0)
rows = []
for k in range(22):
    th = {"diameter": theta["diameter"] * (1 + 1e-4 * rng.normal(size=n))}
    t0 = time.perf_counter(); r = runner.relax(th, start); t1 = time.perf_counter()
    if r is None or not bool(r[2].converged): continue
    p2, q2, info2, pairs2, _ = r
    if pairs2 is not None and pairs2.shape != pairs.shape: continue  # a new pair capacity would compile
    p2n = {k_: np.asarray(v) for k_, v in p2.items()}
    st = runner.state(q2, p2n)
    t2 = time.perf_counter(); jax.block_until_ready(nu_c(st, th, pairs2)); t3 = time.perf_counter()
    jax.block_until_ready(runner.evaluate(q2, p2n, th, pairs2)); t4 = time.perf_counter()
    rows.append((t1 - t0, t3 - t2, t4 - t3, int(info2.steps)))
rows = np.array(rows[2:])  # the first two calls warm up
relax, mod, loss = (float(np.median(rows[:, i])) for i in range(3))
print(json.dumps(dict(n=n, mode=mode, samples=len(rows), relax_ms=relax*1e3, moduli_ms=mod*1e3, loss_grad_ms=loss*1e3,
                      relax_steps=float(np.median(rows[:, 3])), ratio=(relax + loss) / (relax + mod), compiles=runner.compiles)))
