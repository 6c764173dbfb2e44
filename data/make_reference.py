"""Regenerate data/bidisperse_reference.npz: a small relaxed bidisperse packing
and its derivatives by central finite differences, computed independently of
the engine under test.

Independent means: the energy, forces, Hessian and virial pressure below are
written out by hand in NumPy (analytic pair terms, real-space minimum image),
equilibria at θ ± h are found by Newton's method with a pseudo-inverse, and
derivatives are central differences. mdsens is used only to build the initial
random configuration and to relax it once with FIRE (any minimum will do: the
reference re-polishes it with its own Newton iteration and checks its own
force balance).

    python data/make_reference.py          # rewrites data/bidisperse_reference.npz
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

H = 1e-5  # central-difference step: error ~ h² |x'''| ~ 1e-10 plus round-off 1e-16/h ~ 1e-11
OUT = Path(__file__).with_name("bidisperse_reference.npz")


def pair_terms(x, box, sigma_of_pair, epsilon, alpha):
    """Pairs in contact: indices, separation vectors, distances, σ_ij."""
    n = len(x)
    i, j = np.triu_indices(n, k=1)
    dr = x[i] - x[j]
    dr -= box * np.round(dr / box)
    r = np.linalg.norm(dr, axis=1)
    sigma = sigma_of_pair(i, j)
    on = r < sigma
    return i[on], j[on], dr[on], r[on], sigma[on]


def energy_grad_hessian(x, box, sigma_of_pair, epsilon, alpha):
    """E, ∇E (N, d) and the dense Hessian (N d, N d) of the soft-sphere energy."""
    n, d = x.shape
    i, j, dr, r, sigma = pair_terms(x, box, sigma_of_pair, epsilon, alpha)
    u = 1.0 - r / sigma
    e = np.sum(epsilon / alpha * u**alpha)
    d1 = -epsilon / sigma * u ** (alpha - 1)  # φ'(r)
    d2 = epsilon * (alpha - 1) / sigma**2 * u ** (alpha - 2)  # φ''(r)
    nvec = dr / r[:, None]
    grad = np.zeros((n, d))
    np.add.at(grad, i, d1[:, None] * nvec)
    np.add.at(grad, j, -d1[:, None] * nvec)
    hess = np.zeros((n, d, n, d))
    for a, b, nn, p1, p2, rr in zip(i, j, nvec, d1, d2, r):
        k = p2 * np.outer(nn, nn) + p1 / rr * (np.eye(d) - np.outer(nn, nn))
        hess[a, :, a, :] += k
        hess[b, :, b, :] += k
        hess[a, :, b, :] -= k
        hess[b, :, a, :] -= k
    return e, grad, hess.reshape(n * d, n * d)


def virial_pressure(x, box, sigma_of_pair, epsilon, alpha):
    """P = −(1/(d V)) Σ_{i<j} r_ij φ'(r_ij)  (athermal virial pressure)."""
    d = x.shape[1]
    _, _, _, r, sigma = pair_terms(x, box, sigma_of_pair, epsilon, alpha)
    d1 = -epsilon / sigma * (1.0 - r / sigma) ** (alpha - 1)
    return -np.sum(r * d1) / (d * np.prod(box))


def newton(x, box, sigma_of_pair, epsilon, alpha, steps=30):
    """Newton's method on ∇E = 0 with the pseudo-inverse (translations are the
    null space); stops at max|F| < 1e-14."""
    for _ in range(steps):
        _, g, h = energy_grad_hessian(x, box, sigma_of_pair, epsilon, alpha)
        if np.max(np.linalg.norm(g, axis=1)) < 1e-14:
            break
        x = x - (np.linalg.pinv(h, rcond=1e-10, hermitian=True) @ g.ravel()).reshape(x.shape)
    return x


def main() -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    from mdsens import sensitivity, systems

    config = dict(n=16, dim=2, phi=0.92)
    seed = 3
    system = systems.get("bidisperse").build(seed=seed, **config)
    q, info = sensitivity.relax(system, ftol=1e-12)
    assert bool(info.converged)
    box = np.asarray(system.params["box"])
    species = np.asarray(system.species)
    base = {"diameter": np.asarray(system.params["diameter"]), "epsilon": 1.0, "alpha": 2.0}

    def solve(theta, x0):
        def sigma_of_pair(i, j):
            return 0.5 * (theta["diameter"][species[i]] + theta["diameter"][species[j]])

        x = newton(x0, box, sigma_of_pair, theta["epsilon"], theta["alpha"])
        e, g, h = energy_grad_hessian(x, box, sigma_of_pair, theta["epsilon"], theta["alpha"])
        assert np.max(np.linalg.norm(g, axis=1)) < 1e-13, "Newton did not converge"
        eig = np.linalg.eigvalsh(h)
        # A stable, rattler-free minimum: exactly d zero modes (translations), the rest positive.
        assert np.sum(eig < 1e-8) == x.shape[1] and eig.min() > -1e-10, "not a rattler-free minimum"
        return x, e, virial_pressure(x, box, sigma_of_pair, theta["epsilon"], theta["alpha"])

    x_star, e_star, p_star = solve(base, np.asarray(system.to_real(q, system.params)) % box)
    out = {"positions": x_star, "box": box, "species": species, "diameter": base["diameter"],
           "epsilon": base["epsilon"], "alpha": base["alpha"], "energy": e_star, "pressure": p_star,
           "n": config["n"], "dim": config["dim"], "phi": config["phi"], "seed": seed, "h": H}
    elements = [("diameter", 0), ("diameter", 1), ("epsilon", None), ("alpha", None)]
    for name, index in elements:
        results = []
        for sign in (+1, -1):
            theta = {k: np.array(v, dtype=float) for k, v in base.items()}
            if index is None:
                theta[name] = theta[name] + sign * H
            else:
                theta[name][index] += sign * H
            results.append(solve(theta, x_star))
        (xp, ep, pp), (xm, em, pm) = results
        dx = (xp - xm) / (2 * H)
        dx -= dx.mean(axis=0)  # the engine's gauge: no center-of-mass motion
        key = name if index is None else f"{name}{index}"
        out[f"d_position_d_{key}"] = dx
        out[f"d_energy_d_{key}"] = (ep - em) / (2 * H)
        out[f"d_pressure_d_{key}"] = (pp - pm) / (2 * H)
    np.savez(OUT, **out)
    print(f"wrote {OUT}: E = {e_star:.10f}, P = {p_star:.10f}")
    for name, index in elements:
        key = name if index is None else f"{name}{index}"
        print(f"  d/d{key}: dE = {out[f'd_energy_d_{key}']:.10f}, dP = {out[f'd_pressure_d_{key}']:.10f}, "
              f"|dx| = {np.linalg.norm(out[f'd_position_d_{key}']):.8f}")


if __name__ == "__main__":
    main()
