"""Sizing a relaxation on the host: the table's cells and neighbor counts
computed in NumPy equal the compiled ones, and setting a relaxation up (the
capacities, the empty table and pair list, the minimizer's blank state, the
spatial order) compiles no program for a new system."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdsens import minimize, relax, systems

from test_seams import counting_compiles

jax.config.update("jax_enable_x64", True)


def _table(name, **build):
    system = systems.get(name).build(**build)
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    return system, params, relax.Table(system, params)


@pytest.mark.parametrize("build", [
    dict(n=600, dim=2, phi=0.9, seed=3),    # 2D cell list (packed cells)
    dict(n=700, dim=3, phi=0.7, seed=4),    # 3D cell list (padded cells)
    dict(n=40, dim=2, phi=0.85, seed=5),    # all pairs, periodic
])
def test_host_cells_and_counts_are_the_compiled_ones(build):
    system, params, table = _table("bidisperse", **build)
    rng = np.random.default_rng(build["seed"])
    box = np.asarray(params["box"])
    # random positions, some exactly on the box's faces and cell boundaries
    x = rng.uniform(0.0, 1.0, (system.n, system.dim)) * box
    x[:3] = 0.0
    if table.grid is not None:
        x[3:6] = box * (np.arange(1, 4)[:, None] % table.grid) / table.grid
        cells = np.asarray(table._cell_of(jnp.asarray(x)))
        np.testing.assert_array_equal(table.cells_on_host(x), cells)
    width = system.n if table.grid is None else 4 * table.cell_capacity(
        table.cells_on_host(x) if table.grid is not None else np.zeros(system.n, int))
    compiled = tuple(int(c) for c in table._counts(jnp.asarray(x), width, None))
    assert table.counts_on_host(x) == compiled
    assert compiled[1] > 0


def test_free_space_counts():
    system, params, table = _table("morse_cluster", n=13, dim=3, seed=1)
    x = np.asarray(system.positions)
    if table.static:  # no cutoff: every other particle
        assert table.capacities(x) == (system.n - 1, 0)
        return
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    near = (d < table.reach) & ~np.eye(system.n, dtype=bool)
    assert table.counts_on_host(x) == (int(near.sum(1).max()), int(near.sum() // 2))


def test_setting_up_a_relaxation_compiles_nothing(compile_fresh):
    """Capacities, placeholders, the spatial order and the minimizer's blank
    state of a system of a new size: NumPy on the host, no XLA program (each
    eager op compiled one, ~25 small programs per new system before)."""
    system, params, table = _table("bidisperse", n=1030, dim=2, phi=0.9, seed=7)
    x = jnp.asarray(system.positions)
    mini = minimize.make("fire", minimize.periodic_shift, force_fn=lambda x_, p_: x_)
    with counting_compiles() as events:
        order = relax.spatial_order(table, x)
        nbrs, pairs = relax._placeholders(table, jnp.asarray(relax.renumbered(x, order)), order=order)
        state = mini.blank(x)
    assert events == []
    assert sorted(order.tolist()) == list(range(system.n))
    assert nbrs.idx.shape[0] == system.n and pairs.gather.shape == nbrs.idx.shape
    assert float(state.dt) == 0.1 and state.v.shape == x.shape and state.v.dtype == x.dtype


def test_programs_compiled_ahead_serve_the_run(monkeypatch):
    """`job.execute` compiles the derivative programs in a second thread while
    the relaxation runs (from ``AHEAD_MIN_N`` particles): the run then finds
    them compiled for its pairs, padded to the width counted at the start,
    and gives the numbers of a run that compiles them afterwards."""
    from mdsens import cache, job as job_module

    monkeypatch.setattr(job_module, "AHEAD_MIN_N", 64)
    monkeypatch.setattr(job_module.os, "cpu_count", lambda: 2)
    made = []
    original = job_module._Ahead.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(job_module._Ahead, "__init__", spy)
    job = job_module.Job(overrides={"n": "96", "phi": "0.88"}, seed=11, wrt=["diameter[1]"])
    result = job_module.execute(job)
    assert result.converged and len(made) == 1
    ahead = made[0]
    assert ahead.width is not None and not ahead._thread.is_alive()
    # the run's own programs were found compiled: nothing compiled after the relaxation
    before = cache.programs()
    system, observe, wrts = job_module.prepare(job)
    programs = job_module._Programs(observe, (job.solver, job.rtol, job.preconditioner))
    pairs = np.full((2, ahead.width), system.n, np.int32)
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    q = jnp.zeros((system.n, system.dim))
    _, compile_s = job_module.compiled(system, jnp.asarray(pairs), *programs.derivatives(wrts, job.grad), q, params,
                                       jnp.zeros(system.n, bool))
    assert compile_s == 0.0 and cache.programs() == before
    # the same numbers without the thread (default pair width, compiled after)
    monkeypatch.setenv("MDSENS_COMPILE_AHEAD", "0")
    plain = job_module.execute(job)
    assert int(plain.info.steps) == int(result.info.steps)
    for name in ("energy", "pressure"):
        np.testing.assert_allclose(result.observables[name], plain.observables[name], rtol=1e-13)
    a, b = result.sensitivity["diameter[1]"].values, plain.sensitivity["diameter[1]"].values
    assert set(a) == set(b)
    for key in a:  # the same solve, to its tolerance (rtol 1e-10), on sums over differently padded pairs
        np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), rtol=1e-8, atol=1e-10)
