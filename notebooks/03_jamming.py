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
# # Jamming from an ensemble, with the derivatives nobody plotted
#
# 2D 50:50 bidisperse harmonic disks (diameters 1 : 1.4), N = 128 and 256, 64 seeds at each
# of ten packing fractions above jamming, each packing relaxed to max|F| < 1e-10 and
# differentiated exactly with respect to both diameters. O'Hern, Silbert, Liu and Nagel
# (PRE 68, 011306 (2003)) report φ_c ≈ 0.84 for this mixture, P ∝ Δφ, G/B ∝ Δφ^½ and
# Z − 2d ∝ Δφ^½. Here: those fits with uncertainties, and ⟨dP/dD₁⟩ and ⟨dG/dD₁⟩ against φ.
#
# The data: `data/jamming/jamming_nN.json`, made by one command per N on a GPU
# (`bench/gpu/jamming.sh`; on an H200 each took about a minute):
#
#     mdsens ensemble bidisperse --set n=256 --seeds 0:64 \
#         --sweep phi=0.843,0.845,0.8475,0.85,0.855,0.86,0.87,0.88,0.90,0.93 \
#         --observe pressure --observe bulk_modulus --observe shear_modulus \
#         --observe contact_number --observe energy --max-steps 300000 -o jam256.h5
#
# On a CPU the same command works (slower); `MDSENS_JAMMING_RERUN=N` recomputes a small
# ensemble of N particles here instead of reading the files.

# %%
import json
import os
from pathlib import Path

import matplotlib.pyplot as plt  # inline in Jupyter; Agg when run headless as a script
import numpy as np

import mdsens

# The data ship with the repository: found from here upwards, or beside the installed (editable) package.
here = Path.cwd()
candidates = [here, *here.parents, Path(mdsens.__file__).resolve().parent.parent]
root = next(p for p in candidates if (p / "data" / "jamming").is_dir())


def load(n):
    d = json.load(open(root / "data" / "jamming" / f"jamming_n{n}.json"))["members"]
    return {k: np.asarray(v) for k, v in d.items()}


rerun = os.environ.get("MDSENS_JAMMING_RERUN")
if rerun:
    import jax

    jax.config.update("jax_enable_x64", True)
    from mdsens import ensemble, ensemble_io, job

    ej = ensemble.EnsembleJob(job.Job(system="bidisperse", overrides={"n": rerun}, max_steps=300_000,
                                      observe=["pressure", "bulk_modulus", "shear_modulus", "contact_number"]),
                              seeds=range(8), sweeps={"phi": ["0.85", "0.87", "0.90", "0.93"]})
    r = ensemble.run(ej)
    data = {int(rerun): {"phi": r.sweep["phi"], "converged": r.converged, "rattlers": r.rattler.sum(axis=1),
                         **r.observables,
                         **{f"d{k}/ddiameter": v for k, v in r.sensitivity["diameter"].items() if k != "position"}}}
else:
    data = {n: load(n) for n in (128, 256)}
for n, d in data.items():
    print(f"N = {n}: {len(d['phi'])} packings, {int(d['converged'].sum())} converged, "
          f"packing fractions {sorted(set(d['phi'].tolist()))}")

# %% [markdown]
# ## Means and standard errors per packing fraction

# %%
def means(d, key, column=None):
    phis = np.asarray(sorted(set(d["phi"].tolist())))
    m, se = [], []
    for p in phis:
        v = d[key][(d["phi"] == p) & d["converged"]]
        v = v[:, column] if column is not None else v
        m.append(v.mean())
        se.append(v.std(ddof=1) / np.sqrt(len(v)))
    return phis, np.asarray(m), np.asarray(se)


def linear_fit(x, y, sigma):
    """Weighted least squares y = a x + b; returns (a, b) and their covariance."""
    coef, cov = np.polyfit(x, y, 1, w=1 / sigma, cov="unscaled")
    return coef, cov


results = {}
for n, d in data.items():
    phi, P, dP = means(d, "pressure")
    # φ_c: ⟨P⟩ is linear in φ close to jamming; extrapolate it to zero over the lower half.
    near = phi <= np.median(phi)
    (a, b), cov = linear_fit(phi[near], P[near], dP[near])
    phi_c = -b / a
    grad = np.array([b / a**2, -1 / a])  # ∂φ_c/∂(a, b)
    phi_c_err = float(np.sqrt(grad @ cov @ grad))
    delta = phi - phi_c
    ok = delta > 0
    fits = {}
    for label, (y, dy) in {
        "P": (P, dP),
        "G/B": (lambda g, b: (g[1] / b[1], g[1] / b[1] * np.hypot(g[2] / g[1], b[2] / b[1])))(
            means(d, "shear_modulus"), means(d, "bulk_modulus")),
        "Z - 2d": (lambda z: (z[1] - 4.0, z[2]))(means(d, "contact_number")),
    }.items():
        keep = ok & (y > 0)
        (slope, icpt), c = linear_fit(np.log(delta[keep]), np.log(y[keep]), dy[keep] / y[keep])
        fits[label] = (slope, float(np.sqrt(c[0, 0])))
    results[n] = {"phi_c": (phi_c, phi_c_err), **fits}
    print(f"N = {n}: phi_c = {phi_c:.4f} ± {phi_c_err:.4f};  exponents: "
          + ", ".join(f"{k} ∝ Δφ^{v[0]:.2f}±{v[1]:.2f}" for k, v in fits.items() if k != "phi_c"))

# %% [markdown]
# The expected exponents are 1, ½ and ½. With N ≤ 256, a fixed box and Δφ down to about
# 10⁻³, finite-size effects make the fitted G/B and Z exponents drift from ½ (O'Hern et al.
# extrapolate in N). In fixed boxes some packings come out with G ≤ 0: Dagois-Bohy et al.
# (PRL 109, 095703 (2012)) explain why, and the fixed-pressure runs of `mdsens run --set pressure=...`
# with `box_dof=shear` remove it.

# %%
for n, d in data.items():
    bad = int(np.sum((d["shear_modulus"] <= 0) & d["converged"]))
    print(f"N = {n}: {bad} of {int(d['converged'].sum())} fixed-box packings have G <= 0")

# %% [markdown]
# ## The figure: P, G/B, Z and the exact derivatives ⟨dP/dD₁⟩, ⟨dG/dD₁⟩

# %%
fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
for n, d in data.items():
    phi_c = results[n]["phi_c"][0]
    phi, P, dP = means(d, "pressure")
    _, G, dG = means(d, "shear_modulus")
    _, B, dB = means(d, "bulk_modulus")
    _, Z, dZ = means(d, "contact_number")
    delta = phi - phi_c
    ok = delta > 0
    axes[0, 0].errorbar(phi, P, dP, marker="o", capsize=2, label=f"N = {n}, φ_c = {phi_c:.4f}")
    axes[0, 1].errorbar(delta[ok], (G / B)[ok], ((G / B) * np.hypot(dG / G, dB / B))[ok], marker="o", capsize=2,
                        label=f"N = {n}: slope {results[n]['G/B'][0]:.2f}")
    axes[0, 2].errorbar(delta[ok], (Z - 4)[ok], dZ[ok], marker="o", capsize=2,
                        label=f"N = {n}: slope {results[n]['Z - 2d'][0]:.2f}")
    for ax, key, label in ((axes[1, 0], "dpressure/ddiameter", "dP/dD"), (axes[1, 1], "dshear_modulus/ddiameter", "dG/dD"),
                           (axes[1, 2], "dbulk_modulus/ddiameter", "dB/dD")):
        for column, name in ((0, "D₀"), (1, "D₁")):
            x, m, s = means(d, key, column)
            ax.errorbar(x, m, s, marker="o" if column else "s", capsize=2, label=f"N = {n}, d/d{name}")
        ax.set_title(f"⟨{label}⟩ (exact, per packing)")
        ax.set_xlabel("φ")
        ax.axhline(0, color="0.7", lw=0.8)
axes[0, 0].set(xlabel="φ", title="⟨P⟩ (extrapolated to 0 at φ_c)")
axes[0, 1].set(xscale="log", yscale="log", xlabel="φ − φ_c", title="⟨G⟩/⟨B⟩ (½ expected)")
axes[0, 2].set(xscale="log", yscale="log", xlabel="φ − φ_c", title="⟨Z⟩ − 2d (½ expected)")
for ax in axes.ravel():
    ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig("jamming.png", dpi=120)

# %% [markdown]
# A larger diameter raises the pressure (dP/dD > 0 at fixed box) and, above jamming, lowers
# the shear modulus relative to the bulk one — each point is the mean of 64 exact
# derivatives, one linear solve each, not a finite difference between noisy ensembles.
