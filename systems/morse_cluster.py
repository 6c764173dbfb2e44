"""A Morse cluster in free space (no box).

``n`` particles on the close-packed (triangular 2D / FCC 3D) sites nearest to
the origin, spacing σ, each displaced by a small uniform random vector; energy

    E = Σ_{i<j} ε[(1 − e^{−α(r_ij − σ)})² − 1],

minimum −ε at r = σ (all pairs, no cutoff). The zero modes are translations
and rotations (3 in 2D, 6 in 3D, one rotation fewer for a collinear cluster
such as the dimer in 3D); the gauge removes them (:func:`mdsens.gauge.rigid_body`).
``n = 2`` is the dimer: distance σ, d(distance)/dσ = 1.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mdsens import potentials
from mdsens.system import System
from mdsens.systems import _lattice
from mdsens.systems._family import Family, Key, at_least, one_of, positive


def morse_pair(r, i, j, params):
    return potentials.morse(r, params["sigma"], params["epsilon"], params["alpha"])


def build(n: int, dim: int, alpha: float, displacement: float, seed: int = 0) -> System:
    rng = np.random.default_rng(seed)
    positions = _lattice.cluster(dim, n, 1.0) + displacement * rng.uniform(-1.0, 1.0, size=(n, dim))
    params = {"sigma": jnp.asarray(1.0), "epsilon": jnp.asarray(1.0), "alpha": jnp.asarray(float(alpha))}
    config = {"n": n, "dim": dim, "alpha": alpha, "displacement": displacement}
    # All pairs interact (no cutoff): the range is unbounded.
    return System("morse_cluster", positions, np.zeros(n, np.int32), params, morse_pair,
                  cutoff=lambda p: jnp.inf, contact=None, config=config)


FAMILY = Family(
    name="morse_cluster",
    description="Morse cluster in free space (compact close-packed start); n=2 is the dimer",
    keys=(
        Key("n", "int", 13, "number of particles (2 = dimer)", at_least(2)),
        Key("dim", "int", 3, "dimension: 2 or 3", one_of(2, 3)),
        Key("alpha", "float", 6.0, "initial Morse width parameter α (units of 1/σ)", positive),
        Key("displacement", "float", 0.05, "random displacement of each site, uniform in ±value (units of σ)",
            at_least(0.0)),
    ),
    parameters={
        "sigma": "() pair equilibrium distance r0",
        "epsilon": "() well depth ε",
        "alpha": "() width parameter α (range ~ 1/α)",
    },
    build_fn=build,
)
