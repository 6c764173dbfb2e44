"""Bidisperse harmonic soft spheres in a periodic box: the reference case.

The molecular-dynamics experiment of Blondel et al. (2022), "Efficient and
Modular Implicit Differentiation": N particles, half of diameter D₀ = 1.0 and
half D₁ = 1.4, in a square (cubic) box sized for packing fraction φ, energy

    E = Σ_{i<j} (ε/α)(1 − r_ij/σ_ij)^α  for r_ij < σ_ij,  σ_ij = (D_{s_i} + D_{s_j})/2.

The box stays fixed when a diameter changes (φ is only used to size it).
With ``pressure=P`` the box is a degree of freedom instead (``box_dof``: iso,
aniso or shear; :mod:`mdsens.barostat`): the start is sized for
``START_PHI`` (a little above jamming) and the enthalpy E + PV is minimised.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from mdsens import potentials
from mdsens.system import System
from mdsens.systems._family import Family, Key, at_least, one_of, positive, positive_or_none

#: the packing fraction of a fixed-pressure start, by dimension (a little above jamming)
START_PHI = {2: 0.86, 3: 0.66}


def sphere_volume(diameter: np.ndarray, dim: int) -> np.ndarray:
    """Area (2D) or volume (3D) of a disk/sphere of the given diameter."""
    radius = np.asarray(diameter) / 2.0
    return math.pi * radius**2 if dim == 2 else 4.0 / 3.0 * math.pi * radius**3


def box_side(particle_diameters: np.ndarray, dim: int, phi: float) -> float:
    """Side of the square/cubic box in which these particles fill fraction ``phi``."""
    return float((np.sum(sphere_volume(particle_diameters, dim)) / phi) ** (1.0 / dim))


def check_minimum_image(name: str, box: np.ndarray, reach: float) -> None:
    """All-pairs energies use the minimum image: every interaction must reach
    less than half the box."""
    from mdsens.systems._family import UsageError

    if reach >= 0.5 * float(np.min(box)):
        raise UsageError(
            f"{name}: box side {float(np.min(box)):.3g} is too small for interaction range {reach:.3g} "
            "(minimum image needs range < box/2); use more particles"
        )


def soft_sphere_pair(index: np.ndarray):
    """Pair energy and contact rule for soft spheres whose diameter is
    ``params["diameter"][index[i]]`` (species-wise or per particle)."""
    index = jnp.asarray(index)

    def sigma(i, j, params):
        d = params["diameter"]
        return 0.5 * (d[index[i]] + d[index[j]])

    def pair(r, i, j, params):
        return potentials.soft_sphere(r, sigma(i, j, params), params["epsilon"], params["alpha"])

    def contact(r, i, j, params):
        return r < sigma(i, j, params)

    return pair, contact


def soft_sphere_radius(index: np.ndarray):
    """Each particle's interaction radius, ``params["diameter"][index[i]] / 2``: a
    pair of :func:`soft_sphere_pair` interacts within the sum of its radii
    (NumPy in, NumPy out: sizing a table on the host compiles nothing)."""
    index = np.asarray(index)

    def radius(params):
        return 0.5 * params["diameter"][index]

    return radius


def build(n: int, dim: int, phi: float, diameter: tuple[float, ...], epsilon: float, alpha: float,
          seed: int = 0, pressure: float | None = None, box_dof: str = "iso") -> System:
    if pressure is not None:
        phi = START_PHI[dim]
    species = np.zeros(n, dtype=np.int32)
    species[n // 2:] = 1
    diameters = np.asarray(diameter, dtype=np.float64)
    side = box_side(diameters[species], dim, phi)
    box = np.full(dim, side)
    check_minimum_image("bidisperse", box, float(diameters.max()))
    rng = np.random.default_rng(seed)
    positions = rng.uniform(0.0, side, size=(n, dim))
    pair, contact = soft_sphere_pair(species)
    params = {
        "diameter": jnp.asarray(diameters),
        "epsilon": jnp.asarray(float(epsilon)),
        "alpha": jnp.asarray(float(alpha)),
        "box": jnp.asarray(box),
    }
    config = {"n": n, "dim": dim, "phi": phi, "diameter": list(diameter), "epsilon": epsilon, "alpha": alpha}
    system = System("bidisperse", positions, species, params, pair,
                    cutoff=lambda p: jnp.max(p["diameter"]), contact=contact, config=config, specialize=("alpha",),
                    radius=soft_sphere_radius(species))
    return with_pressure(system, pressure, box_dof)


def with_pressure(system: System, pressure: float | None, box_dof: str) -> System:
    """``system`` itself (fixed box), or at fixed ``pressure`` with ``box_dof``."""
    if pressure is None:
        return system
    from mdsens import barostat

    return barostat.at_pressure(system, pressure, box_dof)


#: the fixed-pressure keys, shared by the periodic soft-sphere families
PRESSURE_KEYS = (
    Key("pressure", "float", None, "target pressure P: the box relaxes too, minimising E + P V "
        "(fixed pressure; excludes phi); adds the parameter pressure (--wrt pressure: dphi/dP)", positive_or_none),
    Key("box_dof", "str", "iso", "with pressure: which box degrees of freedom relax: iso (one scale), "
        "aniso (each side) or shear (the full cell)", one_of("iso", "aniso", "shear")),
)


FAMILY = Family(
    name="bidisperse",
    description="50:50 harmonic soft spheres, D = 1.0 and 1.4, periodic box at packing fraction phi "
                "(the paper's reference case)",
    keys=(
        Key("n", "int", 128, "number of particles (half small, half large)", at_least(2)),
        Key("dim", "int", 2, "dimension: 2 or 3", one_of(2, 3)),
        Key("phi", "float", 0.9, "packing fraction that sizes the box", positive),
        Key("diameter", "floats", (1.0, 1.4), "the two species' diameters D0,D1",
            lambda v: positive(v) or (None if len(v) == 2 else "needs exactly two values")),
        Key("epsilon", "float", 1.0, "interaction strength ε", positive),
        Key("alpha", "float", 2.0, "stiffness exponent α (2 = harmonic; must exceed 1)",
            lambda v: None if v > 1 else "must exceed 1"),
        *PRESSURE_KEYS,
    ),
    parameters={
        "diameter": "(2,) species diameters D0, D1",
        "epsilon": "() interaction strength ε",
        "alpha": "() stiffness exponent α",
        "box": "(d,) periodic box side lengths (at fixed pressure: the reference box the strain deforms)",
    },
    build_fn=build,
    exclusive=(("phi", "pressure"),),
    requires={"box_dof": "pressure"},
)
