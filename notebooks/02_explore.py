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
# # Exploring sensitivities: jamming, modes, checks, precision
#
# Four experiments on the bidisperse soft-disk packing of notebook 01:
#
# 1. how the sensitivity grows as the packing approaches jamming from above;
# 2. forward against reverse mode (they are exact transposes);
# 3. the finite-difference check, as a function of the step $h$;
# 4. the Jacobian-precision bound: a derivative taken at an approximate minimum $\hat x$
#    is off by $O(\lVert \hat x - x^* \rVert)$.
#
# Everything is compiled once and reused across parameter values: the packing fraction is
# changed through the box side, an ordinary parameter, so no experiment recompiles.
# `MDSENS_NOTEBOOK_N` sets the number of particles (the test suite uses 32).

# %%
import os

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

import matplotlib.pyplot as plt  # inline in Jupyter; Agg when run headless as a script

from mdsens import linsolve, minimize, observables, sensitivity, systems
from mdsens.systems.bidisperse import box_side

N = int(os.environ.get("MDSENS_NOTEBOOK_N", "128"))
SMALL = N < 128
system = systems.get("bidisperse").build(n=N, phi=0.9, seed=0)
base = {k: jnp.asarray(v) for k, v in system.params.items()}
mini = sensitivity.minimizer_for(system)
observe = {"energy": observables.energy, "pressure": observables.pressure}

# One compiled relaxation for every φ and every tolerance (ftol is a traced argument).
relax = jax.jit(lambda x, p, ftol: minimize.run(mini, system.energy_real, x, p, ftol, 200_000))
# One compiled forward derivative w.r.t. both diameters; the rattler mask is an argument.
forward = jax.jit(lambda q, p, r: sensitivity.forward_fn(system, "diameter", observe, r, linsolve.cg(rtol=1e-12))(q, p))
rattlers = jax.jit(lambda q, p: observables.rattlers(system, q, p))


def at_phi(phi):
    """Parameters with the box sized for packing fraction φ, and the scaled start."""
    side = box_side(np.asarray(base["diameter"])[system.species], system.dim, phi)
    p = dict(base, box=jnp.full(system.dim, side))
    x0 = jnp.asarray(system.positions) / base["box"] * p["box"]
    return p, x0


# %% [markdown]
# ## 1. Approaching jamming
#
# Decompress from φ = 0.9 towards the jamming point (φ_J ≈ 0.84 for this mixture). The
# pressure vanishes linearly, the contact network thins, and the packing becomes *soft*:
# the lowest eigenvalues of $H$ go to zero, so the same parameter change moves the
# particles more and more. Each φ starts from the previous relaxed state (a quasi-static
# decompression) so that we follow one packing.

# %%
phis = np.linspace(0.90, 0.845, 4 if SMALL else 10)
rows = []
q_prev = None
for phi in phis:
    p, x0 = at_phi(phi)
    if q_prev is not None:
        x0 = system.to_real(q_prev, p)
    x, info = relax(x0, p, 1e-12)
    q = system.to_solver(x, p)
    if not bool(info.converged):
        print(f"φ = {phi:.3f}: not converged, skipped")
        continue
    r = rattlers(q, p)
    fw = forward(q, p, r)
    norm = float(jnp.linalg.norm(fw.values["position"][0]))
    rows.append((phi, float(observables.pressure(system, q, p)), norm, float(fw.values["pressure"][0]),
                 int(r.sum()), int(fw.iterations[0])))
    q_prev = q
rows = np.array(rows)
for phi, P, norm, dP, nr, it in rows:
    print(f"φ = {phi:.3f}  P = {P:.2e}  |dx*/dD0| = {norm:8.3f}  dP/dD0 = {dP:.3e}  rattlers {int(nr):3d}  CG {int(it)}")

fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
a.semilogy(rows[:, 0], rows[:, 2], "o-")
a.set_xlabel("φ"); a.set_ylabel("‖∂x*/∂D₀‖"); a.set_title("displacement response")
b.plot(rows[:, 0], rows[:, 3], "o-", label="dP/dD₀")
b.plot(rows[:, 0], rows[:, 1], "s--", label="P")
b.set_xlabel("φ"); b.legend(); b.set_title("pressure and its sensitivity")
fig.tight_layout(); plt.show()

# %% [markdown]
# ## 2. Forward against reverse mode
#
# Forward mode gives the whole displacement field for one parameter direction $v$:
# $J v$. Reverse mode gives, for one output direction $w$, the gradient with respect to all
# parameters at once: $J^\top w$. mdsens applies the same gauge in both, so they are exact
# transposes: $\langle w, J v\rangle = \langle J^\top w, v\rangle$ to round-off.

# %%
p, x0 = at_phi(0.9)
x, info = relax(x0, p, 1e-12)
q = system.to_solver(x, p)
rattler = observables.rattlers(system, q, p)
q = sensitivity.newton_polish(system, q, p, rattler)
equilibrium = sensitivity.equilibrium(system, solve=linsolve.cg(rtol=1e-12))
x_of = lambda prm: system.to_real(equilibrium(q, prm), prm)  # noqa: E731

key_v, key_w = jax.random.split(jax.random.PRNGKey(0))
v = {k: jnp.zeros_like(val) for k, val in p.items()}
v["diameter"] = jax.random.normal(key_v, (2,))
w = jax.random.normal(key_w, (N, system.dim))
_, Jv = jax.jvp(x_of, (p,), (v,))
_, vjp = jax.vjp(x_of, p)
(JTw,) = vjp(w)
lhs = float(jnp.vdot(w, Jv))
rhs = float(sum(jnp.vdot(JTw[k], v[k]) for k in p))
print(f"<w, J v> = {lhs:.12f}\n<Jᵀw, v> = {rhs:.12f}\nrelative gap {abs(lhs - rhs) / abs(lhs):.1e}")
assert abs(lhs - rhs) <= 1e-8 * abs(lhs)

# Reverse mode's strength: dP/dθ for every parameter in one solve.
grad, solve_info = sensitivity.gradient(system, q, p, observables.pressure, rattler, linsolve.cg(rtol=1e-12))
print("dP/dθ (one reverse solve):", {k: np.asarray(val).round(6).tolist() for k, val in grad.items()},
      f"({int(solve_info.iterations)} CG iterations)")
fw = forward(q, p, rattler)
np.testing.assert_allclose(grad["diameter"], fw.values["pressure"], rtol=1e-6)

# %% [markdown]
# ## 3. Finite differences and the step $h$
#
# Central differences have truncation error $O(h^2)$ and round-off/minimizer noise
# $O(\epsilon/h)$; with Newton-polished re-relaxations the sweet spot is near $h = 10^{-5}$.

# %%
u0 = np.asarray(fw.values["position"][0])
steps = [1e-5] if SMALL else [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7]
fd_errors = []
for h in steps:
    fd = sensitivity.finite_difference(system, q, p, "diameter", (0,), h=h)
    fd_errors.append(np.max(np.abs(fd["position"] - u0)) / np.max(np.abs(u0)))
    print(f"h = {h:.0e}: relative error {fd_errors[-1]:.1e}")
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.loglog(steps, fd_errors, "o-")
ax.set_xlabel("h"); ax.set_ylabel("max|FD − implicit| / max|implicit|"); ax.set_title("finite-difference check")
fig.tight_layout(); plt.show()
assert min(fd_errors) < 1e-5

# %% [markdown]
# ## 4. Jacobian precision: the derivative at an approximate minimum
#
# Stop the minimizer early, at `ftol` = 10⁻², 10⁻³, …, and take the implicit derivative at the
# approximate $\hat x$. The paper's bound says the error of the Jacobian is proportional to the
# distance to the true minimum, $\lVert \hat x - x^*\rVert$ (here measured with minimum image,
# centre-of-mass drift removed). The rattler set of the reference state is used throughout so
# that all derivatives are in the same gauge.

# %%
reference = u0
tolerances = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8]
distance, jac_error = [], []
for ftol in tolerances:
    x_hat, info = relax(x0, p, ftol)
    q_hat = system.to_solver(x_hat, p)
    dq = q_hat - q
    dq = dq - jnp.round(dq)
    dx = (dq - jnp.mean(dq[~rattler], axis=0)) * p["box"]
    dx = jnp.where(rattler[:, None], 0.0, dx)
    u_hat = np.asarray(forward(q_hat, p, rattler).values["position"][0])
    distance.append(float(jnp.linalg.norm(dx)))
    jac_error.append(float(np.linalg.norm(u_hat - reference)))
    print(f"ftol {ftol:.0e}: |x̂ − x*| = {distance[-1]:.2e}   |∂x̂/∂D₀ − ∂x*/∂D₀| = {jac_error[-1]:.2e}")
distance, jac_error = np.array(distance), np.array(jac_error)
ratio = jac_error / distance
print("error / distance:", ratio.round(2))

fig, ax = plt.subplots(figsize=(5, 4))
ax.loglog(distance, jac_error, "o-", label="measured")
ax.loglog(distance, np.median(ratio) * distance, "k--", label="∝ ‖x̂ − x*‖")
ax.set_xlabel("‖x̂ − x*‖"); ax.set_ylabel("‖∂x̂/∂D₀ − ∂x*/∂D₀‖"); ax.legend(); ax.set_title("Jacobian precision")
fig.tight_layout(); plt.show()
# Linear: the slope of log(error) against log(distance) is close to 1 over the converged range.
fit = np.isfinite(np.log(distance)) & (distance > 1e-10)
slope = np.polyfit(np.log(distance[fit]), np.log(jac_error[fit]), 1)[0]
print(f"slope {slope:.2f}")
assert 0.7 < slope < 1.3
