"""Polydisperse harmonic soft spheres in a periodic box, one diameter per particle.

N particles with diameters ``D_i = 1 + spread·u_i``, ``u_i`` uniform in [−1, 1]
(drawn from the build's seed), in a square (cubic) box sized for packing
fraction φ, energy

    E = Σ_{i<j} (ε/α)(1 − r_ij/σ_ij)^α  for r_ij < σ_ij,  σ_ij = (D_i + D_j)/2,

with ε = 1 and α = 2 (harmonic) as starting values of their parameters.
``diameter`` is a parameter of shape (N,): a reverse-mode gradient gives
``∂O/∂D_i`` for every particle in one solve.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mdsens.system import System
from mdsens.systems._family import Family, Key, at_least, one_of, positive
from mdsens.systems.bidisperse import (PRESSURE_KEYS, START_PHI, box_side, check_minimum_image,
                                       soft_sphere_pair, soft_sphere_radius, with_pressure)


def build(n: int, dim: int, phi: float, spread: float, seed: int = 0, pressure: float | None = None,
          box_dof: str = "iso") -> System:
    if pressure is not None:
        phi = START_PHI[dim]
    rng = np.random.default_rng(seed)
    diameters = 1.0 + spread * rng.uniform(-1.0, 1.0, size=n)
    side = box_side(diameters, dim, phi)
    box = np.full(dim, side)
    check_minimum_image("polydisperse", box, float(diameters.max()))
    positions = rng.uniform(0.0, side, size=(n, dim))
    pair, contact = soft_sphere_pair(np.arange(n))
    params = {
        "diameter": jnp.asarray(diameters),
        "epsilon": jnp.asarray(1.0),
        "alpha": jnp.asarray(2.0),
        "box": jnp.asarray(box),
    }
    config = {"n": n, "dim": dim, "phi": phi, "spread": spread}
    # One continuous species: the sizes live in the `diameter` parameter.
    species = np.zeros(n, dtype=np.int32)
    system = System("polydisperse", positions, species, params, pair,
                    cutoff=lambda p: jnp.max(p["diameter"]), contact=contact, config=config, specialize=("alpha",),
                    radius=soft_sphere_radius(np.arange(n)))
    return with_pressure(system, pressure, box_dof)


FAMILY = Family(
    name="polydisperse",
    description="harmonic soft spheres with per-particle diameters 1 ± spread (uniform), "
                "periodic box at packing fraction phi",
    keys=(
        Key("n", "int", 64, "number of particles", at_least(2)),
        Key("dim", "int", 2, "dimension: 2 or 3", one_of(2, 3)),
        Key("phi", "float", 0.9, "packing fraction that sizes the box", positive),
        Key("spread", "float", 0.2, "diameters are uniform in [1 − spread, 1 + spread]",
            lambda v: None if 0 <= v < 1 else "must be in [0, 1)"),
        *PRESSURE_KEYS,
    ),
    parameters={
        "diameter": "(N,) per-particle diameters D_i",
        "epsilon": "() interaction strength ε",
        "alpha": "() stiffness exponent α",
        "box": "(d,) periodic box side lengths (at fixed pressure: the reference box the strain deforms)",
    },
    build_fn=build,
    exclusive=(("phi", "pressure"),),
    requires={"box_dof": "pressure"},
)
