"""Minimizers: FIRE 2.0 and gradient descent reach the force tolerance; the
chunked driver on a neighbor table reaches the same minimum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdsens import minimize, relax, sensitivity, systems


def test_fire_reaches_tight_tolerance_and_chunks_are_the_same_loop():
    system = systems.get("bidisperse").build(n=32, dim=2, phi=0.9, seed=4)
    params = dict(system.params)
    mini = sensitivity.minimizer_for(system, "fire")
    x0 = jnp.asarray(system.positions)
    x, info = jax.jit(lambda x_, p: minimize.run(mini, system.energy_real, x_, p, 1e-12, 50_000))(x0, params)
    assert bool(info.converged) and float(info.max_force) < 1e-12
    # Recompute the force outside the loop: the reported value is the real one
    # (to round-off: eager and jitted sums differ in the last bits at |F| ~ 1e-12).
    f = -jax.grad(system.energy_real)(x, params)
    assert abs(float(jnp.max(jnp.linalg.norm(f, axis=1))) - float(info.max_force)) < 1e-14
    seen = []
    out = relax.relax(system, params, x0, ftol=1e-12, max_steps=50_000, chunk=100,
                      callback=lambda step, fmax, t: seen.append(step))
    # The driver: the same FIRE on a neighbor table, in chunks. The same minimum;
    # the force sums differ in round-off, so not bit for bit the same path.
    assert bool(out.info.converged) and float(out.info.max_force) < 1e-12
    d = np.asarray(out.x) - np.asarray(x)
    d -= np.asarray(params["box"]) * np.round(d / np.asarray(params["box"]))
    assert np.max(np.abs(d - d.mean(axis=0))) < 1e-8
    assert abs(int(out.info.steps) - int(info.steps)) <= 0.05 * int(info.steps)
    assert seen == sorted(seen) and seen[-1] == int(out.info.steps) and len(seen) > 1


def test_gradient_descent_converges_and_cap_is_reported():
    system = systems.get("bidisperse").build(n=16, dim=2, phi=0.95, seed=1)
    q, info = sensitivity.relax(system, method="gd", ftol=1e-8, max_steps=100_000)
    assert bool(info.converged)
    # Gradient descent and FIRE may end in different minima from one start, so
    # check the result itself: the force, recomputed, is below the tolerance.
    from mdsens import observables
    assert float(observables.max_force(system, q, system.params)) < 1e-8
    q0 = system.to_solver(jnp.asarray(system.positions), system.params)
    assert float(system.energy(q, system.params)) < float(system.energy(q0, system.params))
    _, capped = sensitivity.relax(system, ftol=1e-12, max_steps=7)
    assert not bool(capped.converged) and int(capped.steps) == 7


def test_fold_is_jnp_mod_bit_for_bit_within_a_box_length():
    # The periodic shift's fold replaces jnp.mod (per-element fmod on XLA:CPU):
    # the same bits for -box < y < 2 box, edges where y / box rounds to an
    # integer included, and always inside [0, box).
    from mdsens.minimize import fold

    rng = np.random.default_rng(0)
    eps = np.finfo(np.float64).eps
    for box in (np.array([1.0, 3.7]), np.array([13.2, 0.1])):
        y = rng.uniform(-1, 2, (20000, 2)) * box
        edges = [box * (1 - eps), box * (1 - eps / 2), -box * eps, box, box * (1 + eps), 2 * box * (1 - eps),
                 -box * (1 - eps), np.nextafter(box, 0), np.nextafter(-box, 0), np.nextafter(2 * box, 0), 0 * box]
        y = np.concatenate([y, np.stack(edges)])
        want = np.asarray(jnp.mod(jnp.asarray(y), jnp.asarray(box)))
        got = np.asarray(jax.jit(fold)(jnp.asarray(y), jnp.asarray(box)))
        assert np.array_equal(want.view(np.int64), got.view(np.int64))
        assert np.all((got >= 0) & (got < box))


def test_squared_length_is_the_reduce_bit_for_bit():
    # The relaxation's squared lengths are written out over the components so that XLA
    # fuses them (minimize.squared_length): the same bits as jnp.sum(v * v, axis=-1),
    # compiled, in 1, 2 and 3 dimensions, and inside a larger expression. (XLA:CPU contracts
    # both into fused multiply-adds; the terms summed in another order give other bits.)
    from mdsens.minimize import squared_length

    rng = np.random.default_rng(1)
    for d in (1, 2, 3):
        v = jnp.asarray(rng.standard_normal((4099, 7, d)) * 10.0 ** rng.uniform(-8, 3, (4099, 7, 1)))
        want = jax.jit(lambda a: jnp.sum(a * a, axis=-1))(v)
        got = jax.jit(squared_length)(v)
        assert np.array_equal(np.asarray(want).view(np.int64), np.asarray(got).view(np.int64))
        near = jax.jit(lambda a: squared_length(a) < 1.0)(v)
        assert np.array_equal(np.asarray(near), np.asarray(want) < 1.0)


def test_fire_max_displacement_caps_each_kick_and_still_converges():
    """``max_displacement`` (LAMMPS's dmax): each step's dt is shortened so that no
    coordinate of dt·v, v after the force kick, exceeds the cap; FIRE's mixing then
    turns v by at most α (≤ 0.1 of |v|). An overlapping start moves farther than the
    cap without it."""
    system = systems.get("bidisperse").build(n=16, dim=2, phi=0.95, seed=1)
    params = dict(system.params)
    box = np.asarray(params["box"])
    cap = 0.02

    def moves(mini, steps=60):
        state = mini.init(jnp.asarray(system.positions), params)
        step = jax.jit(lambda s: mini.step(s, params))
        out = []
        for _ in range(steps):
            new = step(state)
            d = np.asarray(new.x) - np.asarray(state.x)
            d -= box * np.round(d / box)
            # the kick's bound, independently: |v_i| ≤ (1 − α)|v_i| + α|v| after mixing
            out.append((np.max(np.abs(d)), float(state.alpha)))
            state = new
        return out, state

    force = lambda x, p: -jax.grad(system.energy_real)(x, p)
    free, _ = moves(minimize.fire(force_fn=force, shift_fn=minimize.periodic_shift))
    capped, state = moves(minimize.fire(force_fn=force, shift_fn=minimize.periodic_shift, max_displacement=cap))
    assert max(m for m, _ in free) > 2 * cap  # the test can fail: uncapped steps are longer
    n_coords = system.n * system.dim
    for m, alpha in capped:
        assert m <= cap * ((1 - alpha) + alpha * np.sqrt(n_coords)) * (1 + 1e-12)
    assert float(state.dt) > cap  # the state's dt is FIRE's own, only the step is shortened
    # the whole relaxation on the table converges with the cap, to a force-balanced state
    out = relax.relax(system, params, jnp.asarray(system.positions), ftol=1e-10, max_steps=50_000,
                      max_displacement=0.1)
    assert bool(out.info.converged)
    f = -jax.grad(system.energy_real)(out.x, params)
    assert float(jnp.max(jnp.linalg.norm(f, axis=1))) < 1e-9
    with pytest.raises(ValueError, match="FIRE option"):
        minimize.make("gd", max_displacement=0.1, force_fn=force)
