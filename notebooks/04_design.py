# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Inverse design: a Poisson ratio by particle sizes alone
#
# The default 2D polydisperse packing (harmonic disks, diameters 1 ± 0.2, φ = 0.9) has an
# isotropic Poisson ratio ν ≈ 0.70 at N = 64. Here every diameter is tuned, at fixed packing
# fraction, towards ν = 0.3 and ν = 0.85 (`mdsens.design`, what `mdsens design` runs):
#
# 1. relax from the previous x* (warm start; nothing recompiles after the first step);
# 2. the loss ℒ = ((ν − t)/t)² and its exact gradient with respect to all N diameters in
#    one reverse-mode pass (through the moduli's own linear solves: a second-order implicit
#    derivative);
# 3. an Adam step (optax), diameters kept positive, the box rescaled to hold φ.
#
# ν is only piecewise smooth in the diameters: each change of the contact network moves it
# discontinuously (a harmonic contact's stiffness jumps from 0 to k as it closes), and at
# N = 64 almost every step changes a contact. Designing ν itself reaches 0.85 but not 0.3
# (it stalls near 0.35–0.38). What reaches 0.3 is a *guide*: the loss is the pressure, which
# is continuous across contact changes, driven down at fixed φ (the diameters rearrange into
# a better-packed, less non-affine structure), while ν is watched and the design stops at
# the first step within 0.01 of 0.3 (`stop_at`, `--stop-at` on the command line). The design
# counts the contact changes, and every 10th step checks the gradient against central
# differences of the re-relaxed loss. `MDSENS_NOTEBOOK_N` sets N (default 64; the test suite
# runs 32) and `MDSENS_NOTEBOOK_STEPS` the step budget.

# %%
import os
import time

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import matplotlib.pyplot as plt  # inline in Jupyter; Agg when run headless as a script

from mdsens import design
from mdsens.job import Job

N = int(os.environ.get("MDSENS_NOTEBOOK_N", "64"))
STEPS = int(os.environ.get("MDSENS_NOTEBOOK_STEPS", "400" if N >= 64 else "8"))
WITHIN = 0.01  # |ν − target| at which a design stops

# %%
results = {}
# ν = 0.3: the pressure (to 0.005) guides, ν stops the design; ν = 0.85: ν itself is the loss.
losses = {0.3: dict(targets={"pressure": 0.005}, stop_at={"poisson_ratio": 0.3}),
          0.85: dict(targets={"poisson_ratio": 0.85})}
for target in (0.3, 0.85):
    request = design.Design(job=Job(system="polydisperse", overrides={"n": str(N)}, seed=0),
                            vary=["diameter"], keep="phi", steps=STEPS, optimizer="adam", lr=0.002,
                            tol=WITHIN / target, observe=["poisson_ratio"], **losses[target])
    start = time.perf_counter()
    results[target] = result = design.run(request)
    wall = time.perf_counter() - start
    nu = [float(s.values["poisson_ratio"]) for s in result.history]
    best = result.best  # the step written: where stop_at was met, else the lowest loss
    checks = result.fd_checks
    print(f"target {target}: ν {nu[0]:.4f} -> {nu[-1]:.4f} in {len(nu) - 1} updates ({result.stopped}); "
          f"written {nu[best]:.4f} at step {best}")
    print(f"  contact changes {result.contact_changes}, loss jumps {result.jumps}, rejected {result.rejections}; "
          f"gradient checks passed {sum(c['passed'] for c in checks)}/{len(checks)}")
    print(f"  wall {wall:.1f} s (compile {result.timings['compile_s']:.1f} s), "
          f"per step {(result.timings['relax_s'] + result.timings['loss_s']) / len(nu) * 1e3:.0f} ms "
          f"(relax {result.timings['relax_s'] / len(nu) * 1e3:.0f} ms)")

# %% [markdown]
# ν against the step, the targets dashed and the steps where the contact network changed
# marked. The gradient is exact on each smooth branch; a step that crosses into another branch
# can move ν by much more than the gradient predicts.

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for target, result in results.items():
    nu = np.array([float(s.values["poisson_ratio"]) for s in result.history])
    changed = [k for k in range(1, len(result.history))
               if result.history[k].contacts != result.history[k - 1].contacts]
    line, = axes[0].plot(nu, label=f"target {target}")
    axes[0].axhline(target, ls="--", color=line.get_color(), lw=0.8)
    axes[0].plot(changed, nu[changed], ".", color=line.get_color(), ms=3)
    axes[1].semilogy([s.loss for s in result.history], color=line.get_color(), label=f"target {target}")
axes[0].set(xlabel="design step", ylabel="Poisson ratio ν")
axes[1].set(xlabel="design step", ylabel="loss (pressure for 0.3, ν for 0.85)")
axes[0].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# The diameters the design ended with, against where they started (every particle keeps its
# index; the box was rescaled with them so that φ is unchanged).

# %%
fig, ax = plt.subplots(figsize=(4.5, 3.6))
for target, result in results.items():
    d0, d1 = result.history[0].theta["diameter"], result.final.theta["diameter"]
    ax.plot(d0, d1, ".", label=f"target {target}")
    phi = [design.packing_fraction(result.plan.system, {k: jax.numpy.asarray(v) for k, v in s.params.items()})
           for s in (result.history[0], result.final)]
    assert abs(float(phi[1]) - float(phi[0])) < 1e-12
lims = [0.7, 1.3]
ax.plot(lims, lims, "k:", lw=0.8)
ax.set(xlabel="starting diameter", ylabel="designed diameter")
ax.legend()
fig.tight_layout()
plt.show()
