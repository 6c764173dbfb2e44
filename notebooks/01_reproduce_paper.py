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
# # How a jammed packing answers "what if the particles were bigger?"
#
# This notebook reproduces the molecular-dynamics experiment of Blondel et al.,
# *Efficient and Modular Implicit Differentiation* (2022): 128 soft disks, half of
# diameter $D_0 = 1$ and half $D_1 = 1.4$, squeezed into a periodic box at packing
# fraction $\varphi = 0.9$. We relax them to mechanical equilibrium and ask how every
# particle's equilibrium position $x^*$ moves when a diameter changes: $\partial x^*/\partial D$.
#
# **The method in three lines.** At a minimum of the energy $E(x, \theta)$ the force vanishes,
# $\nabla_x E(x^*(\theta), \theta) = 0$, for every parameter value $\theta$. Differentiating that
# identity in $\theta$ (the implicit function theorem) gives one linear system,
#
# $$ H \, \frac{\partial x^*}{\partial \theta} = -\,\partial_\theta \nabla_x E, \qquad H = \nabla_x^2 E(x^*, \theta), $$
#
# which we solve with conjugate gradients using only Hessian-vector products. We never
# differentiate through the thousands of minimizer steps: the minimizer is a black box.
#
# Set `MDSENS_NOTEBOOK_N` to run on fewer particles (the test suite uses 32).

# %%
import os

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)  # derivatives need float64 (docs/design.md, "Accuracy")

import matplotlib.pyplot as plt  # inline in Jupyter; Agg when run headless as a script

from mdsens import linsolve, observables, plot, sensitivity, systems

N = int(os.environ.get("MDSENS_NOTEBOOK_N", "128"))
PAPER = N == 128

# %% [markdown]
# ## 1. The system
#
# A `System` holds the initial positions, the species and the differentiable parameters
# $\theta$ — a flat dict of arrays. The energy is the harmonic soft-sphere potential
# $E = \sum_{i<j} \frac{\varepsilon}{\alpha}(1 - r_{ij}/\sigma_{ij})^\alpha$ for overlapping pairs,
# $\sigma_{ij} = (D_{s_i} + D_{s_j})/2$.

# %%
system = systems.get("bidisperse").build(n=N, phi=0.9, seed=0)
params = {k: jnp.asarray(v) for k, v in system.params.items()}
print({k: np.asarray(v).tolist() for k, v in params.items()})

# %% [markdown]
# ## 2. Relax: find $x^*$
#
# FIRE (a damped-dynamics minimizer) runs until the largest force is below `ftol`.
# The positions come back in *solver coordinates* $q = x/L$ (fractional), in which the box
# is an ordinary parameter.

# %%
q, info = sensitivity.relax(system, params, ftol=1e-10)
print(f"converged: {bool(info.converged)} in {int(info.steps)} steps, max|F| = {float(info.max_force):.1e}")
energy = float(observables.energy(system, q, params))
pressure = float(observables.pressure(system, q, params))
print(f"E = {energy:.7f} ε,  P = {pressure:.7f} ε/σ²")

# %% [markdown]
# ## 3. Zero modes: the gauge
#
# $H$ is singular. In a periodic box a global translation costs no energy ($d$ zero modes),
# and *rattlers* — particles with fewer than $d+1$ load-bearing contacts — have empty rows.
# The right-hand side has no component along these modes, so the system is consistent, and
# mdsens picks the solution without any: centre of mass fixed, rattlers fixed.

# %%
rattler = observables.rattlers(system, q, params)
print(f"rattlers: {int(rattler.sum())} of {N};  mean contacts per held particle Z = "
      f"{float(observables.contact_number(system, q, params)):.3f}")

# %% [markdown]
# ## 4. The derivative, forward mode
#
# `sensitivity.forward` solves $H u = -(\partial_\theta \nabla_x E)\,\delta\theta$ once per element of
# the parameter (here $D_0$ and $D_1$) and pushes $u$ through the observables with the chain rule.

# %%
observe = {"energy": observables.energy, "pressure": observables.pressure}
fw = sensitivity.forward(system, q, params, "diameter", observe, rattler, linsolve.cg(rtol=1e-10))
u = np.asarray(fw.values["position"])  # (2, N, 2): dx*/dD_0 and dx*/dD_1
norms = np.linalg.norm(u.reshape(2, -1), axis=1)
print("|dx*/dD|   =", norms)
print("dE/dD      =", np.asarray(fw.values["energy"]))
print("dP/dD      =", np.asarray(fw.values["pressure"]))
print("CG iterations", np.asarray(fw.iterations), " residuals", np.asarray(fw.residual))
if PAPER:  # the reference numbers quoted in README.md ("A tour")
    np.testing.assert_allclose(norms, [19.317778, 16.446475], rtol=1e-5)
    np.testing.assert_allclose(fw.values["energy"], [2.2343425, 3.13065285], rtol=1e-6)

# %% [markdown]
# ## 5. The paper's figure
#
# Each disk to scale, coloured by species; arrows show $\partial x_i^*/\partial D_0$ — how each
# particle moves when the *small* particles grow. The response is collective and long-ranged:
# particles move in swirls, not radially away from their neighbours. Right: the distribution of
# $|\partial x_i^*/\partial D_0|$ spans two decades.

# %%
record = {
    "positions": np.asarray(system.to_real(q, params)), "box": np.asarray(params["box"]),
    "species": np.asarray(system.species), "rattler": np.asarray(rattler),
    "parameters": {k: np.asarray(v) for k, v in params.items()},
    "observables": {"energy": energy, "pressure": pressure},
    "sensitivity": {"diameter": {"values": {"position": u}}},
    "meta": {"system": "bidisperse"},
}
fig = plot.figure(record, "diameter[0]")
plt.show()

# %% [markdown]
# ## 6. Any JAX transformation goes through the equilibrium
#
# `sensitivity.equilibrium(system)` is a function $q^*(q_0, \theta)$ made differentiable by
# `custom_root`: its derivative is the linear solve above, whatever minimizer ran inside.
# Starting from the relaxed $q$ it costs one force evaluation, so we can write the energy at
# equilibrium as a plain function of $\theta$ and ask `jax.grad` (reverse mode: one solve for the
# gradient with respect to *every* parameter).

# %%
equilibrium = sensitivity.equilibrium(system)


def energy_at_equilibrium(p):
    return observables.energy(system, equilibrium(q, p), p)


grad = jax.grad(energy_at_equilibrium)(params)
print("dE*/dθ by jax.grad:", {k: np.asarray(v).round(6).tolist() for k, v in grad.items()})
np.testing.assert_allclose(grad["diameter"], fw.values["energy"], rtol=1e-6)  # reverse = forward

# %% [markdown]
# ## 7. Trust, but verify: finite differences
#
# Re-relax at $D_0 \pm h$ from $x^*$, polish with a few Newton steps, and difference.
# The agreement is limited by the finite-difference truncation and the re-relaxation,
# ~$10^{-7}$ relative.

# %%
fd = sensitivity.finite_difference(system, q, params, "diameter", (0,), h=1e-5, observe=observe)
error = np.max(np.abs(fd["position"] - u[0])) / np.max(np.abs(u[0]))
print(f"relative error of dx*/dD_0 against central differences: {error:.1e}")
assert error < 1e-5
