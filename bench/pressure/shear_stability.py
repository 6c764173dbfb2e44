"""Shear stability of ensembles (mdsens ensemble files with --observe shear_modulus,
elastic_tensor, pressure, packing_fraction): per swept value, the mean pressure and
packing fraction, and how many converged members have G <= 0 (the isotropic shear
modulus) and G_min <= 0 (the smallest shear modulus over all shear directions, 2D).

    python bench/pressure/shear_stability.py FILE.h5 ...
"""
import sys, h5py, numpy as np
def gmin(C):
    """Smallest shear modulus over all shear directions: the lowest eigenvalue of
    (1/2) e_a:C:e_b on the two unit deviatoric strains (its trace is 2 G)."""
    E = [np.array([[1, 0], [0, -1]]) / np.sqrt(2), np.array([[0, 1], [1, 0]]) / np.sqrt(2)]
    M = np.array([[np.einsum("ij,mijkl,kl->m", a, C, b) for b in E] for a in E]) / 2
    return np.linalg.eigvalsh(M.transpose(2, 0, 1))[:, 0]
for path in sys.argv[1:]:
    f = h5py.File(path); g = f["ensemble"]; o = g["observables"]
    key = "pressure" if "pressure" in g else "phi"
    vals = g[key][()]
    conv = g["converged"][()]
    G = o["shear_modulus"][()]; P = o["pressure"][()]; phi = o["packing_fraction"][()]
    Gm = gmin(o["elastic_tensor"][()])
    t = g.attrs["timings"]
    print(path, g.attrs.get("ensemble", "fixed box"), "timings", t)
    for v in np.unique(vals):
        m = (vals == v) & conv
        print(f"  {key}={v}: {m.sum()}/{(vals==v).sum()} converged; <P> = {P[m].mean():.4g} ± {P[m].std(ddof=1)/np.sqrt(m.sum()):.2g};"
              f" <phi> = {phi[m].mean():.4f} ± {phi[m].std(ddof=1)/np.sqrt(m.sum()):.4f}; <G> = {G[m].mean():.4g};"
              f" G<=0: {(G[m]<=0).sum()}/{m.sum()}; Gmin<=0: {(Gm[m]<=0).sum()}/{m.sum()};"
              f" unjammed (P < 1e-8): {(P[m] < 1e-8).sum()}; steps max {g['steps'][()][m].max()}")
