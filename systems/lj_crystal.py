"""A Lennard-Jones crystal in a periodic box, with optional vacancies.

Sites of a triangular (2D) or FCC (3D) lattice at the pair-potential minimum
spacing ``a = 2^{1/6} σ`` (σ = 1 initially), ``vacancies`` of them removed at
random, the rest displaced by a small uniform random vector; energy

    E = Σ_{i<j} 4ε[(σ/r)^12 − (σ/r)^6] · S(r),

with jax-md's smooth multiplicative cutoff ``S`` going from 1 at ``onset·σ`` to
0 at ``cutoff·σ`` (both scale with the σ parameter). Every particle is held
(no rattlers); the zero modes are the d translations.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mdsens import potentials
from mdsens.system import System
from mdsens.systems import _lattice
from mdsens.systems._family import Family, Key, UsageError, at_least, one_of, positive
from mdsens.systems.bidisperse import check_minimum_image

MINIMUM = 2.0 ** (1.0 / 6.0)  # r_min / σ of the Lennard-Jones pair


def lj_pair(onset: float, cutoff: float):
    """Pair energy with parameters ``sigma``, ``epsilon``; onset/cutoff in units of σ."""

    def pair(r, i, j, params):
        sigma = params["sigma"]
        return potentials.lennard_jones(r, sigma, params["epsilon"], onset * sigma, cutoff * sigma)

    return pair


def build(dim: int, cells: int, vacancies: int, displacement: float, onset: float, cutoff: float,
          seed: int = 0) -> System:
    if onset >= cutoff:
        raise UsageError(f"lj_crystal: onset={onset} must be below cutoff={cutoff}")
    sites, box = _lattice.close_packed(dim, cells, MINIMUM)
    if vacancies > len(sites) - 2:
        raise UsageError(f"lj_crystal: vacancies={vacancies} leaves fewer than 2 of the {len(sites)} sites")
    check_minimum_image("lj_crystal", box, cutoff)
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.permutation(len(sites))[vacancies:])
    positions = sites[keep] + displacement * rng.uniform(-1.0, 1.0, size=(len(keep), dim))
    positions = np.mod(positions, box)
    params = {"sigma": jnp.asarray(1.0), "epsilon": jnp.asarray(1.0), "box": jnp.asarray(box)}
    config = {"dim": dim, "cells": cells, "vacancies": vacancies, "displacement": displacement,
              "onset": onset, "cutoff": cutoff}
    return System("lj_crystal", positions, np.zeros(len(keep), np.int32), params, lj_pair(onset, cutoff),
                  cutoff=lambda p: cutoff * p["sigma"], contact=None, config=config)


FAMILY = Family(
    name="lj_crystal",
    description="Lennard-Jones crystal (triangular 2D / FCC 3D at the LJ minimum spacing) with smooth cutoff, "
                "optional vacancies, periodic box",
    keys=(
        Key("dim", "int", 2, "dimension: 2 (triangular) or 3 (FCC)", one_of(2, 3)),
        Key("cells", "int", 6, "lattice cells per side (2D: 2 sites per a × a√3 cell; 3D: 4 per cube)",
            at_least(1)),
        Key("vacancies", "int", 0, "number of lattice sites left empty (chosen at random)", at_least(0)),
        Key("displacement", "float", 0.05, "random displacement of each site, uniform in ±value (units of σ)",
            at_least(0.0)),
        Key("onset", "float", 2.0, "smooth cutoff starts at onset·σ", positive),
        Key("cutoff", "float", 2.5, "interaction vanishes beyond cutoff·σ", positive),
    ),
    parameters={
        "sigma": "() Lennard-Jones length σ (the cutoff scales with it)",
        "epsilon": "() Lennard-Jones well depth ε",
        "box": "(d,) periodic box side lengths",
    },
    build_fn=build,
)
