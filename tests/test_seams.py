"""The engine's seams (issue 13): the model apart from state and θ, one solver factory, no silent
failure, compile once; one NAME[i] spelling, one registry of observables, one box check."""

import contextlib
import re

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdsens import cache, elasticity, implicit, linsolve, observables, sensitivity, systems


@pytest.fixture(scope="module")
def relaxed():
    # The 2D packing of tests/test_implicit.py (the same helpers.relaxed key: relaxed to
    # 1e-12 and Newton-polished; its programs compiled once per run)
    import helpers

    system, q, params, rattler = helpers.relaxed("bidisperse", seed=1, n=16, dim=2, phi=0.95)
    return system, params, q, rattler


#: the equilibrium's tolerance in the derivatives below: the one tests/test_implicit.py
#: differentiates with, so that the compiled jvp programs are shared (helpers.equilibrium_jvp)
FTOL = 1e-12


@pytest.fixture(scope="module")
def dense_tangent(relaxed):
    """dq*/dσ_large at the relaxed state through equilibrium() with the dense exact solve."""
    from helpers import equilibrium_jvp

    system, params, q, _ = relaxed
    dp = {k: jnp.zeros_like(v) for k, v in params.items()}
    dp["diameter"] = jnp.asarray([0.0, 1.0])
    return dp, equilibrium_jvp(system, ftol=FTOL, solve=linsolve.dense())(q, params, dp)[1]  # jit: 3× faster


def test_equilibrium_is_preconditioned_and_exact(relaxed, dense_tangent):
    """equilibrium() builds its solve at the root (twolevel by default); its
    derivative equals the dense exact solve's."""
    system, params, q, _ = relaxed
    dp, dense = dense_tangent
    from helpers import equilibrium_jvp

    outs = []
    for kwargs in ({}, {"preconditioner": "jacobi"}):
        # compiled, not op by op (the preconditioner's setup was dispatched eagerly)
        outs.append(equilibrium_jvp(system, ftol=FTOL, **kwargs)(q, params, dp)[1])
    outs.append(dense)
    np.testing.assert_allclose(outs[0], outs[2], rtol=0, atol=1e-8)
    np.testing.assert_allclose(outs[1], outs[2], rtol=0, atol=1e-8)
    assert float(jnp.max(jnp.abs(outs[2]))) > 1e-3


def test_unconverged_relaxation_and_capped_solve_are_nan(relaxed):
    system, params, q, _ = relaxed
    start = jnp.asarray(system.to_solver(jnp.asarray(system.positions), params))
    short = sensitivity.equilibrium(system, max_steps=5)
    capped = sensitivity.equilibrium(system, solve=linsolve.cg(maxiter=2))
    dp = {k: jnp.zeros_like(v) for k, v in params.items()}
    dp["diameter"] = jnp.asarray([1.0, 0.0])

    @jax.jit  # one compiled program, not op by op (the same three computations)
    def failures(start_, q_, p_, dp_):
        grad = jax.grad(lambda d: observables.energy(system, short(start_, {**p_, "diameter": d}),
                                                     {**p_, "diameter": d}))(p_["diameter"])
        return short(start_, p_), grad, jax.jvp(lambda p: capped(q_, p), (p_,), (dp_,))[1]

    relaxed_short, grad, tangent = failures(start, q, params, dp)
    assert bool(jnp.all(jnp.isnan(relaxed_short)))
    # an observable of the failed state and its gradient are NaN too (not a finite energy of garbage)
    assert bool(jnp.all(jnp.isnan(grad)))
    # A CG capped at 2 iterations does not reach 1e-10: the tangent is NaN, not a plausible number.
    assert bool(jnp.all(jnp.isnan(tangent)))
    # (an uncapped CG gives a finite tangent: test_equilibrium_is_preconditioned_and_exact)


def test_equilibrium_on_a_pair_list_misses_no_contact(relaxed, dense_tangent):
    """equilibrium(system.with_pairs(pairs)): a list taken at the random start
    misses contacts that form during the relaxation, so the result is NaN, not
    the minimum of a truncated energy; a list that covers q* (a neighbor list
    with a skin) gives q* and the derivative of the whole system."""
    from mdsens.system import pad_pairs

    system, params, q_star, _ = relaxed
    start = jnp.asarray(system.to_solver(jnp.asarray(system.positions), params))
    frozen = system.with_pairs(pad_pairs(system.interacting_pairs(start, params), system.n))
    out = sensitivity.equilibrium(frozen)(start, params)
    if bool(jnp.all(jnp.isfinite(out))):  # then it must be an equilibrium of the whole energy
        force = jax.grad(system.energy)(out, params)
        assert float(jnp.max(jnp.abs(force))) < 1e-8
        assert int(sensitivity.missing_pairs(frozen, out, params)) == 0
    else:
        assert bool(jnp.all(jnp.isnan(out)))
    # a list that covers q*: q* itself, and the derivative of the whole system
    listed = system.with_pairs(pad_pairs(system.interacting_pairs(q_star, params, margin=0.3), system.n))
    assert int(sensitivity.missing_pairs(listed, q_star, params)) == 0
    assert int(listed.pairs.shape[1]) < system.n * (system.n - 1) // 2
    dp, want = dense_tangent
    got, tangent = jax.jit(lambda p, d: jax.jvp(lambda p_: sensitivity.equilibrium(listed)(q_star, p_), (p,), (d,)))(
        params, dp)
    np.testing.assert_allclose(got, q_star, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tangent, want, rtol=0, atol=1e-8)
    assert float(jnp.max(jnp.abs(want))) > 1e-3


def test_moduli_solves_follow_the_solver_options(relaxed, monkeypatch):
    """Inside sensitivity.solving(...), the elastic moduli's solves come from
    solver_for with those options (they ignored --solver/--preconditioner)."""
    system, params, q, _ = relaxed
    calls = []
    real = sensitivity.solver_for

    def spy(*args, **kwargs):
        calls.append(args[4:])
        return real(*args, **kwargs)

    monkeypatch.setattr(sensitivity, "solver_for", spy)
    plain = float(observables.shear_modulus(system, q, params))
    assert calls == []
    with sensitivity.solving("dense", 1e-10, "none"):
        dense = float(observables.shear_modulus(system, q, params))
    assert calls and calls[0][0] == "dense"
    assert elasticity.SOLVE_AT.get() is None
    np.testing.assert_allclose(plain, dense, rtol=1e-8)


@contextlib.contextmanager
def counting_compiles(pause: list | None = None):
    """Count XLA backend compilations inside the block (jax.monitoring); none
    are counted while ``pause`` is non-empty."""
    from jax._src import dispatch

    events: list[str] = []

    def listener(event, duration, **kwargs):
        if event == dispatch.BACKEND_COMPILE_EVENT and not (pause or []):
            events.append(event)

    # every compilation must happen to be counted: not loaded from the test run's shared programs
    shared = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        jax.config.update("jax_enable_compilation_cache", shared)


def test_forward_and_gradient_compile_once(relaxed):
    """A second call with new parameters, positions or rattlers of the same
    shapes — or on a new build of the same model — reuses the compiled function."""
    system, params, q, rattler = relaxed
    observe = {"energy": observables.OBSERVABLES["energy"]}
    first = sensitivity.forward(system, q, params, "diameter", observe, rattler)
    grad = sensitivity.gradient(system, q, params, observables.OBSERVABLES["energy"], rattler)
    moved = {**params, "epsilon": params["epsilon"] * 1.1}
    other = systems.get("bidisperse").build(n=16, phi=0.95, seed=5)  # another build, the same model
    assert other.model == system.model and other is not system
    q2, rattler2 = q * 1.0, jnp.array(rattler)  # new arrays (eager operations compile: outside the count)
    before = cache.programs()
    with counting_compiles() as compiled:
        second = sensitivity.forward(other, q2, moved, "diameter", observe, rattler2)
        grad2, _ = sensitivity.gradient(other, q2, moved, observables.OBSERVABLES["energy"], rattler)
    assert compiled == [] and cache.programs() == before
    # E is linear in ε at fixed q*, and q* does not depend on ε: dE/dD and dE/dθ scale by 1.1
    np.testing.assert_allclose(second.values["energy"], 1.1 * first.values["energy"], rtol=1e-9)
    np.testing.assert_allclose(grad2["diameter"], 1.1 * grad[0]["diameter"], rtol=1e-9)
    assert float(jnp.max(jnp.abs(first.values["energy"]))) > 1e-3


def test_execute_compiles_once_outside_the_relaxation(monkeypatch):
    """A second run with new parameter values and positions (another seed,
    another ε: a new build of the same model) compiles nothing outside the
    relaxation: rattlers, observables, forward and reverse derivatives come from
    the programs of the first run, and give the dense solve's numbers."""
    from mdsens import job as _job

    paused: list = []
    real = _job.relax_system

    def relax_system(*args, **kwargs):  # the relaxation's table may need another capacity: not counted here
        paused.append(1)
        try:
            return real(*args, **kwargs)
        finally:
            paused.pop()

    monkeypatch.setattr(_job, "relax_system", relax_system)
    options = dict(wrt=["diameter", "epsilon"], grad=["energy"], observe=["energy", "pressure"])
    _job.execute(_job.Job(overrides={"n": "16", "phi": "0.95"}, seed=1, **options))
    before = cache.programs()
    with counting_compiles(paused) as compiled:
        result = _job.execute(_job.Job(overrides={"n": "16", "phi": "0.95", "epsilon": "1.5"}, seed=2, **options))
    assert result.converged and compiled == [] and cache.programs() == before
    dense = sensitivity.forward_fn(result.system, "diameter", {"energy": observables.OBSERVABLES["energy"]},
                                   result.rattler, linsolve.dense())(result.q, result.params)
    np.testing.assert_allclose(result.sensitivity["diameter"].values["position"], dense.values["position"],
                               rtol=0, atol=1e-8)
    np.testing.assert_allclose(result.sensitivity["diameter"].values["energy"], dense.values["energy"], rtol=1e-8)
    assert float(np.max(np.abs(dense.values["position"]))) > 1e-3


def test_relaxation_programs_are_keyed_by_the_model():
    """relax.py's compiled chunks belong to the model, not the System object: new
    builds of seeds already seen (new System objects) relax compiling nothing,
    to the bitwise same x* (a table shared between systems of one model changes
    nothing but shapes); another model with the same N and d compiles its own."""
    from mdsens import relax

    family = systems.get("bidisperse")

    def run(seed, fam=family):
        s = fam.build(n=16, phi=0.95, seed=seed)
        return relax.relax(s, {k: jnp.asarray(v) for k, v in s.params.items()}, jnp.asarray(s.positions))

    first = [run(seed) for seed in (11, 12)]  # the table capacity settles at the larger need of the two
    with counting_compiles() as compiled:
        again = [run(seed) for seed in (11, 12)]
    assert compiled == [] and all(a.compile_s < 0.5 for a in again)
    # one table for the model: both now run at the larger capacity (seed 11 first ran on a narrower one),
    # and the force does not depend on it
    assert [b.stats.capacity for b in again] == [max(a.stats.capacity for a in first)] * 2
    for a, b in zip(first, again):
        assert bool(b.info.converged) and bool(jnp.all(a.x == b.x))
    # the Newton polish too: compiled once per model and shapes, not on every call
    polished = []
    for k, seed in enumerate((11, 12)):
        s = family.build(n=16, phi=0.95, seed=seed)
        params = {k_: jnp.asarray(v) for k_, v in s.params.items()}
        with counting_compiles() as compiled:
            polished.append(relax.newton_polish(s, params, first[k].x, 1e-13))
        assert k == 0 or compiled == []
        f = relax.pair_force_fn(s)(polished[-1][0], polished[-1][2].idx, params)
        assert float(jnp.max(jnp.abs(f))) < 1e-13
    with counting_compiles() as compiled:
        other = run(11, systems.get("polydisperse"))
    assert compiled and bool(other.info.converged)


def test_a_second_ensemble_of_the_model_compiles_nothing():
    """ensemble.run: a second call with other seeds and another ε (the same model)
    compiles neither its batched relaxation nor its derivative program, and its
    derivatives are the dense solve's."""
    from mdsens import ensemble
    from mdsens.job import Job

    def run(seeds, **overrides):
        job = Job(system="bidisperse", overrides={"n": "16", "phi": "0.95", **overrides}, grad=["energy"])
        return ensemble.run(ensemble.EnsembleJob(job, seeds=seeds))

    # Seeds whose random starts need a table of every other particle (the cap
    # at N = 16, no cell list): any later batch of the model fits the same
    # shapes. (Seeds that needed less would leave a later batch one compile
    # for its wider table.)
    first = run(range(5, 7))
    assert first.meta["table_capacity"] == [16]
    with counting_compiles() as compiled:
        result = run(range(0, 2), epsilon="1.5")
    assert compiled == [] and result.timings["compile_s"] == 0.0 and bool(np.all(result.converged))
    member = systems.get("bidisperse").build(n=16, phi=0.95, epsilon=1.5, seed=1)
    params = {k: jnp.asarray(v) for k, v in member.params.items()}
    q = jnp.asarray(member.to_solver(jnp.asarray(result.position[1]), params))
    rattler = jnp.asarray(result.rattler[1])
    dense = sensitivity.forward_fn(member, "diameter", {}, rattler, linsolve.dense())(q, params)
    np.testing.assert_allclose(result.sensitivity["diameter"]["position"][1], dense.values["position"],
                               rtol=0, atol=1e-8)
    assert float(np.max(np.abs(dense.values["position"]))) > 1e-3


def test_fixed_pressure_programs_are_keyed_by_the_model():
    """barostat.relax on a new build of the same fixed-pressure model (another
    seed) compiles nothing, and still reaches the target pressure."""
    from mdsens import barostat

    def build(seed):
        return systems.get("bidisperse").build(n=16, pressure=0.05, box_dof="shear", seed=seed)

    first = barostat.relax(build(0), ftol=1e-11)
    assert bool(first.info.converged)
    other = build(1)
    with counting_compiles() as compiled:
        second = barostat.relax(other, ftol=1e-11)
    assert compiled == [] and second.compile_s == 0.0 and bool(second.info.converged)
    pressure = observables.pressure(other, second.q, second.params)
    np.testing.assert_allclose(float(pressure), 0.05, rtol=1e-8)


def test_batch_relaxation_serves_a_slightly_smaller_cutoff_without_compiling():
    """ensemble.relax_batch at diameters 0.5% smaller (a finite difference, a
    sweep step) reuses the batch's table and compiled chunk, and its members
    are still minima of the all-pairs energy."""
    from mdsens import ensemble, minimize

    builds = [systems.get("bidisperse").build(n=16, phi=0.95, seed=s) for s in (3, 4)]
    params = ensemble.stack([b.params for b in builds])
    x0 = jnp.stack([jnp.asarray(b.positions) for b in builds])
    first = ensemble.relax_batch(builds[0], params, x0)
    assert bool(np.all(first.converged))
    smaller = dict(params, diameter=params["diameter"] * 0.995)
    with counting_compiles() as compiled:
        second = ensemble.relax_batch(builds[0], smaller, first.x)
    assert compiled == [] and second.compile_s == 0.0 and bool(np.all(second.converged))
    for m, build in enumerate(builds):
        p = {k: v[m] for k, v in smaller.items()}
        force = -jax.grad(lambda x_: build.energy_real(x_, p))(jnp.asarray(second.x[m]))
        assert float(minimize.max_force(force)) < 1e-9


def test_pairs_are_padded_to_few_widths():
    from mdsens.system import pad_pairs

    widths = {m: pad_pairs(np.zeros((2, m), np.int32), 7).shape[1] for m in range(1, 5000)}
    assert all(m <= w <= max(8, 1.125 * m) for m, w in widths.items())
    assert len(set(widths.values())) < 80
    padded = np.asarray(pad_pairs(np.array([[0, 1], [2, 3]]), 7, 5))
    assert padded.tolist() == [[0, 1, 7, 7, 7], [2, 3, 7, 7, 7]]


# -- seam 1: the model apart from the state and θ -----------------------------------------


def test_the_model_is_a_hashable_static_value():
    """Builds of one configuration are one model whatever the seed or parameter
    values; another N, species, pair (LJ onset) or box dofs is another; the
    model is a jit static argument (one compile for two builds), and its
    template computes what the system does from θ and q alone."""
    bidisperse, lj = systems.get("bidisperse"), systems.get("lj_crystal")
    a, b = bidisperse.build(n=16, seed=0), bidisperse.build(n=16, seed=1, epsilon=2.0, diameter=(1.0, 1.2))
    assert a.model == b.model and hash(a.model) == hash(b.model)
    others = [bidisperse.build(n=18), systems.get("polydisperse").build(n=16),
              bidisperse.build(n=16, pressure=0.1), bidisperse.build(n=16, pressure=0.1, box_dof="aniso"),
              lj.build(cells=5), lj.build(cells=5, onset=2.2)]
    models = [a.model] + [s.model for s in others]
    assert len(set(models)) == len(models)
    assert lj.build(cells=5, seed=4).model == lj.build(cells=5).model
    energy = jax.jit(lambda model, q, p: model.template.energy(q, p), static_argnums=0)
    for s in (a, b):
        p = {k: jnp.asarray(v) for k, v in s.params.items()}
        q = s.to_solver(jnp.asarray(s.positions), p)
        np.testing.assert_allclose(energy(s.model, q, p), s.energy(q, p), rtol=1e-12)
    assert energy._cache_size() == 1
    rebuilt = a.model.system(a.positions, a.params)
    assert rebuilt.model == a.model and np.array_equal(rebuilt.positions, a.positions)
    # the template carries no run's numbers: positions and θ are NaN
    template = a.model.template
    assert np.isnan(template.positions).all() and all(np.isnan(v).all() for v in template.params.values())


def test_a_system_built_in_python_runs_like_the_cli(tmp_path):
    """execute() takes a System built in Python — here by hand, from the
    potential — and gives the numbers `mdsens run` writes for the same
    configuration."""
    from typer.testing import CliRunner

    from mdsens import io
    from mdsens.cli import app
    from mdsens.job import Job, execute
    from mdsens.system import System
    from mdsens.systems.bidisperse import box_side, soft_sphere_pair

    n, seed = 16, 3
    species = np.repeat(np.arange(2, dtype=np.int32), n // 2)
    side = box_side(np.array([1.0, 1.4])[species], 2, 0.9)
    positions = np.random.default_rng(seed).uniform(0.0, side, size=(n, 2))
    pair, contact = soft_sphere_pair(species)
    params = {"diameter": jnp.array([1.0, 1.4]), "epsilon": jnp.asarray(1.0), "alpha": jnp.asarray(2.0),
              "box": jnp.full(2, side)}
    system = System("bidisperse", positions, species, params, pair, lambda p: jnp.max(p["diameter"]), contact,
                    specialize=("alpha",))
    args = ["--wrt", "diameter", "--grad", "energy", "--observe", "energy", "--observe", "pressure"]
    out = tmp_path / "cli.h5"
    done = CliRunner().invoke(app, ["run", "bidisperse", "--set", f"n={n}", "--seed", str(seed), *args, "-o", str(out)])
    assert done.exit_code == 0, done.output
    cli = io.read(out)
    record = execute(Job(system=system, seed=seed, wrt=["diameter"], grad=["energy"],
                         observe=["energy", "pressure"])).record()
    io.write(tmp_path / "python.h5", record)  # the same file format
    mine = io.read(tmp_path / "python.h5")
    np.testing.assert_allclose(mine["positions"], cli["positions"], rtol=0, atol=1e-10)
    for name in ("energy", "pressure"):
        np.testing.assert_allclose(mine["observables"][name], cli["observables"][name], rtol=1e-9)
    for wrt in ("diameter",):
        for key, value in cli["sensitivity"][wrt]["values"].items():
            np.testing.assert_allclose(mine["sensitivity"][wrt]["values"][key], value, rtol=1e-7, atol=1e-9)
    for key, value in cli["gradient"]["energy"]["values"].items():
        np.testing.assert_allclose(mine["gradient"]["energy"]["values"][key], value, rtol=1e-7, atol=1e-12)
    with pytest.raises(systems.UsageError, match="overrides apply to a catalogue name only"):
        execute(Job(system=system, overrides={"n": "8"}))


def test_one_minimizer_factory():
    from mdsens import minimize

    x = jnp.zeros((3, 2))
    assert type(minimize.make("fire", energy_fn=lambda x_, p_: jnp.sum(x_**2)).init(x, {})).__name__ == "FireState"
    assert type(minimize.make("gd", energy_fn=lambda x_, p_: jnp.sum(x_**2)).init(x, {})).__name__ == "DescentState"
    with pytest.raises(ValueError, match="unknown minimizer 'bfgs': choose 'fire' or 'gd'"):
        minimize.make("bfgs")


# -- seam 6: one registry of observables, one box check -------------------------------------


@pytest.fixture(scope="module")
def small_systems():
    out = []
    for family, keys in (("bidisperse", dict(n=8, dim=2)), ("bidisperse", dict(n=32, dim=3)),
                         ("morse_cluster", dict(n=3, dim=2)), ("lj_crystal", dict(cells=5, dim=2))):
        system = systems.get(family).build(seed=0, **keys)
        params = {k: jnp.asarray(v) for k, v in system.params.items()}
        out.append((family, system, params, jnp.asarray(system.to_solver(jnp.asarray(system.positions), params))))
    return out


@pytest.mark.parametrize("name", sorted(observables.OBSERVABLES))
def test_the_registry_knows_each_observables_shape_unit_and_needs(name, small_systems):
    """The registry's shape is what the function returns (by tracing it), and
    its unit is the one physics gives (pressure-like: energy per volume)."""
    from mdsens import io

    entry = observables.OBSERVABLES[name]
    assert entry.name == name and entry.description and entry.fn.__name__ == name
    for family, system, params, q in small_systems:
        reason = observables.requirement(system, name)
        if reason is None:
            shape = jax.eval_shape(lambda q_, p_: entry(system, q_, p_), q, params).shape
            assert shape == entry.shape(system.dim), (family, system.dim)
        else:  # refused up front, and by the function itself, with the same one line
            assert reason.startswith(f"observable {name!r} needs ") and f"system {family!r}" in reason
            with pytest.raises(ValueError) as err:
                entry(system, q, params)
            assert str(err.value) == reason
    d = 3
    energy, volume, length = (observables.unit(n, d) for n in ("energy", "volume", "position"))
    expected = {"pressure": io.divide_units(energy, volume), "max_force": io.divide_units(energy, length),
                "volume": "sigma3", "cell": length, "energy_per_particle": energy}
    for same in ("stress", "elastic_tensor", "bulk_modulus", "shear_modulus"):
        expected[same] = expected["pressure"]
    for ratio in ("packing_fraction", "poisson_ratio", "contact_number", "rattler_fraction"):
        expected[ratio] = "1"
    if name in expected:
        assert entry.unit_in(d) == expected[name]


def test_box_needing_observables_are_refused_up_front_on_free_space(tmp_path):
    """--observe or --grad of anything that needs a box, on a free-space system:
    one line, exit 2, no file — before any relaxation (stress and the moduli
    used to fail only after it, with exit 1)."""
    from typer.testing import CliRunner

    from mdsens.cli import app

    runner = CliRunner()
    boxed = [n for n, o in observables.OBSERVABLES.items() if "box" in o.needs]
    assert {"pressure", "stress", "volume", "cell", "elastic_tensor", "bulk_modulus"} <= set(boxed)
    out = tmp_path / "x.h5"
    for args in (["--observe", "stress"], ["--observe", "bulk_modulus"], ["--grad", "pressure"],
                 ["--observe", "energy", "--grad", "volume"]):
        result = runner.invoke(app, ["run", "morse_cluster", "--set", "n=3", *args, "-o", str(out)])
        assert result.exit_code == 2, result.output
        line = result.stderr.strip()
        assert "\n" not in line and "needs a periodic box; system 'morse_cluster' is in free space" in line
        assert not out.exists()
    result = runner.invoke(app, ["run", "lj_crystal", "--observe", "contact_number", "-o", str(out)])
    assert result.exit_code == 2 and "needs a contact rule; system 'lj_crystal' has none" in result.stderr
    assert not out.exists()


def test_one_box_message_for_every_caller():
    from mdsens import barostat

    system = systems.get("morse_cluster").build(n=3, dim=2)
    messages = []
    for call in (lambda: barostat.at_pressure(system, 0.1),
                 lambda: elasticity.elastic_tensor(system, jnp.asarray(system.positions), dict(system.params),
                                                   jnp.zeros(3, bool)),
                 lambda: observables.require_box(system, "something")):
        with pytest.raises(ValueError) as err:
            call()
        messages.append(str(err.value))
    assert all(m.endswith(" needs a periodic box; system 'morse_cluster' is in free space") for m in messages)
    assert messages[0].startswith("fixed pressure ")


def test_one_solver_check_for_every_caller(relaxed, tmp_path):
    """--solver and --preconditioner are checked in one place: Job (the CLI)
    and solver_for (equilibrium, the moduli) refuse a bad name with the same
    one-line message; the command line exits 2 without a file."""
    from typer.testing import CliRunner

    from mdsens.cli import app
    from mdsens.job import Job, prepare
    from mdsens.systems import UsageError

    system, params, q, rattler = relaxed
    for option, bad, message in (("solver", "lu", "unknown linear solver 'lu': choose 'auto' or 'cg' or 'dense' or 'sparse'"),
                                  ("preconditioner", "ilu", "unknown preconditioner 'ilu': choose 'none' or 'jacobi' "
                                                            "or 'twolevel'")):
        options = {"solver": "cg", "preconditioner": "twolevel", option: bad}
        with pytest.raises(UsageError) as from_job:
            prepare(Job(overrides={"n": "16"}, **options))
        with pytest.raises(UsageError) as from_solve:
            sensitivity.solver_for(system, q, params, rattler, options["solver"], 1e-10, options["preconditioner"])
        assert str(from_job.value) == str(from_solve.value) == message
        for command in ("run", "bench"):  # `mdsens bench` makes the same check
            result = CliRunner().invoke(app, [command, "--set", "n=16", f"--{option}", bad,
                                              "-o", str(tmp_path / "x.h5")])
            assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output
            assert len(result.stderr.strip().splitlines()) == 1
            assert not (tmp_path / "x.h5").exists()


def test_pressure_parameter_and_model_potential_units(tmp_path):
    """The fixed-pressure parameter `pressure` has a unit (an energy density, so
    dx*/dP is a length per energy density); the parameter units follow the
    potential recorded from the model, not the system's name."""
    from mdsens import io

    n, d = 4, 2
    record = {
        "positions": np.random.default_rng(0).uniform(0, 3, (n, d)), "box": np.full(d, 3.0),
        "species": np.zeros(n, int), "rattler": np.zeros(n, bool),
        "parameters": {"pressure": np.asarray(0.1), "alpha": np.asarray(2.0), "box": np.full(d, 3.0)},
        "observables": {"energy": np.asarray(1.0)},
        "sensitivity": {"pressure": {"values": {"position": np.zeros((n, d)), "energy": np.asarray(0.0)},
                                     "iterations": 1, "residual": 0.0}},
        "meta": {"system": "from_file", "potential": "morse", "configuration": {"path": "x"}},
    }
    io.write(tmp_path / "p.h5", record)
    units = io.units_of(tmp_path / "p.h5")
    pressure = io.divide_units(observables.unit("energy", d), observables.unit("volume", d))
    assert units["/parameters/pressure"] == pressure == "epsilon sigma-2"
    assert units["/sensitivity/pressure/position"] == io.divide_units("sigma", pressure)
    assert units["/sensitivity/pressure/energy"] == "sigma+2"  # an energy over an energy density: a volume
    assert units["/parameters/alpha"] == "sigma-1"  # Morse's width: from the recorded potential
    assert io.model_potential(systems.get("morse_cluster").build(n=3)) == "morse"
    assert io.model_potential(systems.get("bidisperse").build(n=8)) == "harmonic"


def _tiny_record(sensitivity_key: str = "diameter[1]", meta: dict | None = None) -> dict:
    n, d = 4, 2
    return {
        "positions": np.random.default_rng(1).uniform(0, 3, (n, d)), "box": np.full(d, 3.0),
        "species": np.array([0, 0, 1, 1]), "rattler": np.zeros(n, bool),
        "parameters": {"diameter": np.array([1.0, 1.4]), "epsilon": np.asarray(1.0), "box": np.full(d, 3.0)},
        "observables": {"energy": np.asarray(1.0), "pressure": np.asarray(0.5)},
        "sensitivity": {sensitivity_key: {"values": {"position": np.ones((n, d)), "energy": np.asarray(2.0)},
                                          "iterations": 1, "residual": 0.0}},
        "meta": meta or {"system": "bidisperse"},
    }


def test_one_spelling_of_names_from_the_command_line_to_the_file(tmp_path):
    """--wrt is stored under its canonical spelling; every reader takes that
    spelling, and a file whose group is not a name is a one-line FormatError."""
    from mdsens import io, plot
    from mdsens.cli.show import summarize
    from mdsens.export import derivative_fields
    from mdsens.job import Job, prepare

    _, _, wrts = prepare(Job(overrides={"n": "16"}, wrt=[" diameter[ 1 ] ", "epsilon", "diameter"]))
    assert wrts == [("diameter[1]", "diameter", (1,)), ("epsilon", "epsilon", None), ("diameter", "diameter", None)]
    path = tmp_path / "r.h5"
    io.write(path, _tiny_record())
    record = io.read(path)
    assert list(record["sensitivity"]) == ["diameter[1]"]
    assert [(c, label) for c, label, _ in derivative_fields(record)] == [("dx_ddiameter_1", "diameter[1]")]
    assert plot.select_field(record, "diameter")[0] == plot.select_field(record, "diameter[ 1 ]")[0] == "diameter[1]"
    for bad, reason in (("diameter[x]", "index 'x'"), ("diameter[0]", "not in the file")):
        with pytest.raises(plot.PlotError, match=r"^--wrt '.*': .*" + re.escape(reason)):
            plot.select_field(record, bad)
    summary = summarize(record)
    assert list(summary["sensitivity"]["diameter[1]"]["most_sensitive"]) == ["diameter[1]"]
    assert summary["units"]["observables"] == {"energy": "epsilon", "pressure": "epsilon sigma-2"}
    assert summary["units"]["parameters"] == {"diameter": "sigma", "epsilon": "epsilon", "box": "sigma"}
    bad = tmp_path / "bad.h5"
    io.write(bad, _tiny_record())
    with h5py.File(bad, "a") as f:
        f.move("sensitivity/diameter[1]", "sensitivity/diameter[x]")
    with pytest.raises(io.FormatError) as err:
        io.read(bad)
    assert "/sensitivity/diameter[x]: not a parameter name (index 'x'" in str(err.value)
    assert "\n" not in str(err.value)
