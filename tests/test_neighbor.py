"""The neighbor table (mdsens.relax): its pairs give all-pairs energies and derivatives
at a shared x*; its forces are the energy's; overflow reallocates; it matches brute force."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdsens import minimize, observables, relax, sensitivity, systems
from mdsens.job import Job, execute

from helpers import relaxed, relative_error


def _shared(n=96, phi=0.9):
    system, q, params, rattler = relaxed("bidisperse", n=n, dim=2, phi=phi)
    table = relax.Table(system, params)
    nbrs = table.allocate(system.to_real(q, params))
    return system, system.with_pairs(jnp.asarray(relax.pairs_from_table(nbrs.idx, system.n))), q, params, rattler


def test_energy_forces_observables_agree_at_shared_minimum():
    # Same pairs, different summation order: agreement to round-off (1e-10 is
    # the bar; the observed differences are ~1e-15).
    system, listed, q, params, rattler = _shared()

    @jax.jit  # one compiled program, not op by op
    def measure(q_, p_):
        values = {key: (observables.energy(s, q_, p_), observables.pressure(s, q_, p_))
                  for key, s in (("all", system), ("listed", listed))}
        values["all"] = (*values["all"], jax.grad(system.energy)(q_, p_))
        values["listed"] = (*values["listed"], jax.grad(listed.energy)(q_, p_), observables.rattlers(listed, q_, p_))
        return values

    out = measure(q, params)
    for k in range(2):  # energy, pressure
        assert abs(float(out["all"][k]) - float(out["listed"][k])) <= 1e-10 * abs(float(out["all"][k]))
    g_all, g_nl = out["all"][2], out["listed"][2]
    assert float(jnp.max(jnp.abs(g_all - g_nl))) < 1e-10
    assert np.array_equal(np.asarray(out["listed"][3]), np.asarray(rattler))


def test_derivatives_agree_at_shared_minimum():
    # The Hessian-vector products differ only in round-off, so the CG solves agree
    # to about their tolerance (rtol 1e-12 here); checked at 1e-10.
    system, listed, q, params, rattler = _shared()
    solve = sensitivity.linsolve.cg(rtol=1e-12)
    observe = {"pressure": observables.pressure}
    a = sensitivity.forward(system, q, params, "diameter", observe, rattler, solve)
    b = sensitivity.forward(listed, q, params, "diameter", observe, rattler, solve)
    assert relative_error(b.values["position"], a.values["position"]) < 1e-10
    assert relative_error(b.values["pressure"], a.values["pressure"]) < 1e-10
    ga, _ = sensitivity.gradient(system, q, params, observables.pressure, rattler, solve)
    gb, _ = sensitivity.gradient(listed, q, params, observables.pressure, rattler, solve)
    assert relative_error(gb["diameter"], ga["diameter"]) < 1e-10


def _brute_force(system, x, params, reach):
    n = system.n
    dr = np.asarray(x)[:, None, :] - np.asarray(x)[None, :, :]
    if system.periodic:
        box = np.asarray(params["box"])
        dr = dr - box * np.round(dr / box)
    near = np.sum(dr**2, axis=-1) < reach**2
    np.fill_diagonal(near, False)
    return [set(np.nonzero(row)[0]) for row in near]


def test_table_matches_brute_force_with_and_without_cells():
    # 2D and 3D, the cell list (N ≥ CELL_LIST_THRESHOLD, box ≥ 3 cells) and the all-pairs build.
    for dim, n in ((2, 600), (3, 1200), (2, 40)):
        system = systems.get("bidisperse").build(n=n, dim=dim, phi=0.9, seed=3)
        params = {k: jnp.asarray(v) for k, v in system.params.items()}
        table = relax.Table(system, params)
        assert table.cell_list == (n >= relax.CELL_LIST_THRESHOLD)
        x = jnp.asarray(system.positions)
        nbrs = table.allocate(x)
        assert not relax.overflowed(nbrs)
        want = _brute_force(system, x, params, table.reach)
        got = [set(int(j) for j in row if j < n) for row in np.asarray(nbrs.idx)]
        assert got == want
        if table.cell_list:  # each pair within its own reach: the radii's sum plus the skin
            radius = np.asarray(system.radius({k: np.asarray(v) for k, v in params.items()}))
            table = relax.Table(system, params, radius=system.radius)
            capacity, cells = table.capacities(x, radius=radius)
            nbrs = jax.jit(table.build, static_argnums=(1, 2))(x, capacity, cells, radius=jnp.asarray(radius))
            assert not relax.overflowed(nbrs)
            want = _brute_force(system, x, params, radius[:, None] + radius[None, :] + table.skin)
            assert [set(int(j) for j in row if j < n) for row in np.asarray(nbrs.idx)] == want
            most, pairs = table.counts_on_host(x, radius)
            assert (most, pairs) == (max(map(len, want)), sum(map(len, want)) // 2)


def test_compact_rows_is_the_sorted_rows_cut_to_capacity(monkeypatch):
    """compact_rows against the whole-row sort it replaces: rows of widths around a
    32-candidate word (31, 33, 100), near fractions from none to all, capacities below
    and above the most near candidates of a row (the overflow flag), with the word
    found by comparison and by bisection."""
    rng = np.random.default_rng(7)
    n, rows = 5000, 60
    for limit in (1 << 20, 0):
        monkeypatch.setattr(relax, "COMPACT_COMPARE_LIMIT", limit)  # read when traced: one jit per setting
        compact = jax.jit(lambda c, m, k, n_: relax.compact_rows(c, m, k, n_), static_argnums=(2, 3))  # a fresh trace
        for width in (31, 33, 100):
            cand = np.stack([rng.permutation(n)[:width] for _ in range(rows)]).astype(np.int32)
            cand[rng.random(cand.shape) < 0.1] = n  # padding among the candidates
            for fraction in (0.0, 0.05, 0.4, 1.0):
                near = (rng.random(cand.shape) < fraction) & (cand < n)
                most = int(near.sum(axis=1).max())
                want_all = np.concatenate([np.sort(np.where(near, cand, n), axis=1),
                                           np.full((rows, 8), n)], axis=1)
                for capacity in (1, 6, width // 2, width + 3):
                    got, overflow = compact(jnp.asarray(cand), jnp.asarray(near), capacity, n)
                    assert bool(overflow) == (most > capacity)
                    if not overflow:  # an overflowing table is rebuilt bigger: its entries are not used
                        np.testing.assert_array_equal(np.asarray(got), want_all[:, :capacity],
                                                      err_msg=f"{limit} {width} {fraction} {capacity}")


def test_rebuild_test_is_the_sum_of_the_two_largest_displacements():
    """Table.moved against NumPy's two largest displacements (minimum image): a unique
    largest, the largest attained twice (the second is then the largest again), one
    particle moved, none moved; just below and just above the skin."""
    system = systems.get("bidisperse").build(n=40, dim=2, phi=0.9, seed=3)
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    table = relax.Table(system, params)
    box = np.asarray(params["box"])
    x0 = np.mod(np.asarray(system.positions), box)
    nbrs = table.allocate(jnp.asarray(x0))
    rng = np.random.default_rng(0)
    cases = {"unique": rng.uniform(-0.05, 0.05, x0.shape), "tie": np.zeros_like(x0), "one": np.zeros_like(x0),
             "none": np.zeros_like(x0)}
    cases["unique"][7] = [0.1, 0.0]
    cases["unique"][11] = [0.0, -0.08]
    cases["tie"][[3, 19]] = [[0.0625, 0.0], [0.0, -0.0625]]  # exact in binary: the same |dx|, second = first
    cases["one"][5] = [0.2, 0.0]
    for name, dx in cases.items():
        d = np.sort(np.linalg.norm(dx, axis=1))[::-1]
        reach = d[0] + d[1]
        for skin in (reach * (1 - 1e-9), reach * (1 + 1e-9)) if reach > 0 else (table.skin,):
            table.skin = skin
            x = np.mod(x0 + dx, box)  # wrapped across the box where a particle leaves it
            if name == "tie":  # the tie is exact where the test computes it
                d2 = np.sum(np.asarray(table._wrap(jnp.asarray(x) - nbrs.reference, None)) ** 2, axis=1)
                assert d2[3] == d2[19] == d2.max()
            assert bool(table.moved(jnp.asarray(x), nbrs)) == (reach > skin), (name, skin)


def _every_family(n_bidisperse=600):
    """(family, system, θ, x) for each interaction family: cells or all pairs,
    periodic or free space, and the static Morse table."""
    for family, config in (("bidisperse", {"n": n_bidisperse, "dim": 2}), ("polydisperse", {"n": 30, "dim": 3}),
                           ("lj_crystal", {"dim": 2}), ("morse_cluster", {"n": 7, "dim": 3})):
        system = systems.get(family).build(seed=1, **config)
        params = {k: jnp.asarray(v) for k, v in system.params.items()}
        x = jnp.asarray(system.positions)
        yield family, system, params, jnp.mod(x, params["box"]) if system.periodic else x


def test_pair_list_forces_are_the_energy_gradient_and_the_table_forces():
    # The pair list computes each pair once and gathers it back into the rows:
    # the energy's gradient for every family (cells, all pairs, free space,
    # the static Morse table), and the table force to round-off; the table's
    # energy is the energy.
    # Compiled, not op by op (85 s eagerly on 2 cores); a fresh jit for each
    # call that must retrace (another capacity, the bisection switch). The
    # rounding checks below still compare compiled against compiled.
    def pair_list(idx, n, capacity):
        return jax.jit(relax.pair_list, static_argnums=(1, 2))(idx, n, capacity)

    for family, system, params, x in _every_family():
        table = relax.Table(system, params)
        nbrs = table.allocate(x)
        capacity = table.pair_capacity(x, nbrs.cells.shape[1])
        pairs = pair_list(nbrs.idx, system.n, capacity)
        assert not bool(pairs.overflow), family
        listed = {tuple(p) for p in np.stack([np.asarray(pairs.i), np.asarray(pairs.j)], 1) if p[0] != p[1]}
        assert listed == {tuple(p) for p in relax.pairs_from_table(nbrs.idx, system.n).T}, family
        f = jax.jit(relax.pair_list_force_fn(system))(x, pairs, params)
        assert relative_error(f, -jax.jit(jax.grad(system.energy_real))(x, params)) < 1e-12, family
        assert relative_error(f, jax.jit(relax.pair_force_fn(system))(x, nbrs.idx, params)) < 1e-14, family
        e = jax.jit(lambda x, idx, p: relax.table_energy(system, x, idx, p))(x, nbrs.idx, params)
        assert abs(float(e) - float(jax.jit(system.energy_real)(x, params))) <= 1e-12 * abs(float(e)), family
        # Too small a capacity is flagged, never truncated silently.
        assert bool(pair_list(nbrs.idx, system.n, len(listed) - 1).overflow), family
        # Wide tables find the partner's slot by bisection instead of counting: the same list.
        limit, relax.PAIR_COUNT_LIMIT = relax.PAIR_COUNT_LIMIT, 0
        try:
            bisected = jax.jit(lambda idx: relax.pair_list(idx, system.n, capacity))(nbrs.idx)
        finally:
            relax.PAIR_COUNT_LIMIT = limit
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(bisected, pairs)), family


def _gather_targets(pairs, idx, n):
    """For each table entry, the pair its ``gather`` points at and the sign taken
    (``(i, j, lower)``), or (-1, -1, False) on the zero."""
    capacity = pairs.i.shape[0]
    g = np.asarray(pairs.gather)
    p = np.where(g < 2 * capacity, g % capacity, 0)
    i, j = np.asarray(pairs.i)[p], np.asarray(pairs.j)[p]
    zero = g == 2 * capacity
    return np.where(zero, -1, i), np.where(zero, -1, j), (g >= capacity) & ~zero


def test_rows_in_candidate_order_give_the_sorted_table_s_pair_list():
    # Where a build compacts wide cell-list rows (3D), the relaxation keeps them in
    # candidate order and computes each entry's mirror slot from the cells instead
    # of bisecting a sorted row: the same entries per row, the same pairs, each entry
    # gathering its own pair with the right sign, and the force to round-off. A
    # renumbered start (cell order) and a random one; a 2D table (sorted rows: the
    # same code as before) and an all-pairs 3D one pass through unchanged.
    cases = [(3, 700, 0.64, 1), (3, 1200, 0.6, 3), (2, 600, 0.9, 3), (3, 200, 0.64, 2)]
    for dim, n, phi, seed in cases:
        system = systems.get("bidisperse").build(n=n, dim=dim, phi=phi, seed=seed)
        params = {k: jnp.asarray(v) for k, v in system.params.items()}
        table = relax.Table(system, params)
        x = jnp.mod(jnp.asarray(system.positions), params["box"])
        for order in ((None, relax.spatial_order(table, x)) if table.cell_list else (None,)):
            xs = x if order is None else x[order]
            capacity, cells = table.capacities(xs)
            pair_capacity = table.pair_capacity(xs, cells)
            build = jax.jit(table.build_pairs, static_argnums=(1, 2, 3))
            model = None if order is None else jnp.asarray(order)  # the pair function's numbering
            nbrs, pairs = build(xs, capacity, cells, pair_capacity, model)
            assert not bool(nbrs.overflow), (dim, n)
            sorted_nbrs = jax.jit(table.build, static_argnums=(1, 2))(xs, capacity, cells)
            idx = np.asarray(nbrs.idx)
            np.testing.assert_array_equal(np.sort(idx, axis=1), np.asarray(sorted_nbrs.idx))
            if dim == 3 and table.cell_list:
                assert not np.all(np.diff(idx, axis=1) >= 0)  # really another order
            want = relax.pair_list(sorted_nbrs.idx, n, pair_capacity, model)
            got = {tuple(p) for p in zip(np.asarray(pairs.i), np.asarray(pairs.j)) if p[0] != p[1]}
            assert got == {tuple(p) for p in zip(np.asarray(want.i), np.asarray(want.j)) if p[0] != p[1]}
            i, j, lower = _gather_targets(pairs, idx, n)
            rows = np.broadcast_to(np.arange(n)[:, None], idx.shape)
            listed = idx < n
            assert np.array_equal(i[listed], np.minimum(rows, idx)[listed])
            assert np.array_equal(j[listed], np.maximum(rows, idx)[listed])
            assert np.array_equal(lower[listed], (idx < rows)[listed]) and np.all(i[~listed] == -1)
            force = jax.jit(relax.pair_list_force_fn(system))
            assert relative_error(force(xs, pairs, params), force(xs, want, params)) < 1e-14
            # Too small a pair capacity, or rows cut short, are flagged.
            assert bool(build(xs, capacity, cells, len(got) - 1, None)[0].overflow)
            if dim == 3 and table.cell_list:
                assert bool(build(xs, capacity // 2, cells, pair_capacity, None)[0].overflow)


def test_3d_resumed_relaxation_on_candidate_order_rows_retraces_the_uninterrupted_one(monkeypatch):
    # Rows in candidate order sum a particle's force in an order set by the cells
    # at the build: a resumed run rebuilds where the saved table was built (the
    # checkpoint carries that point) and takes exactly the same steps. Renumbered
    # in cell order (forced here) as large systems are; the table returned is
    # sorted.
    monkeypatch.setattr(relax, "SORT_THRESHOLD", 0)
    system = systems.get("bidisperse").build(n=600, dim=3, phi=0.66, seed=4)
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    assert relax.Table(system, params).cell_list
    saved = []
    out = relax.relax(system, params, chunk=300, checkpoint=saved.append, checkpoint_every=0.0)
    assert bool(out.info.converged) and len(saved) >= 3
    assert all(np.all(np.diff(row) >= 0) for row in np.asarray(out.idx))
    middle = saved[len(saved) // 2]
    assert middle["reference"].shape == (system.n, 3)
    assert not np.array_equal(middle["reference"], middle["x"])  # built some steps before the save
    resumed = relax.relax(system, params, chunk=300, resume=middle)
    assert int(resumed.info.steps) == int(out.info.steps)
    np.testing.assert_array_equal(np.asarray(resumed.x), np.asarray(out.x))


def test_3d_relaxation_table_gives_the_all_pairs_derivatives():
    # A 3D relaxation on a cell list (rows in candidate order, each pair within
    # its own reach): the table it returns holds every interacting pair at x*, so
    # energy, pressure, forces and the gradient of the pressure in the diameters
    # over its pairs are those over all pairs.
    system = systems.get("bidisperse").build(n=600, dim=3, phi=0.66, seed=6)
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    out = relax.relax(system, params)
    assert bool(out.info.converged) and out.stats.cell_list
    q = system.to_solver(out.x, params)
    listed = system.with_pairs(jnp.asarray(relax.pairs_from_table(out.idx, system.n)))
    rattler = observables.rattlers(system, q, params)
    # a frozen list from the table covers q* (pairs within their own range), as
    # equilibrium() checks before it trusts one
    assert int(jax.jit(lambda q_, p_: sensitivity.missing_pairs(listed, q_, p_))(q, params)) == 0

    @jax.jit
    def measure(q_, p_):
        return {key: (observables.energy(s, q_, p_), observables.pressure(s, q_, p_), jax.grad(s.energy)(q_, p_))
                for key, s in (("all", system), ("listed", listed))}

    out_ = measure(q, params)
    for k in range(2):
        assert abs(float(out_["all"][k]) - float(out_["listed"][k])) <= 1e-12 * abs(float(out_["all"][k]))
    assert float(jnp.max(jnp.abs(out_["all"][2] - out_["listed"][2]))) < 1e-12
    solve = sensitivity.linsolve.cg(rtol=1e-12)
    ga, _ = sensitivity.gradient(system, q, params, observables.pressure, rattler, solve)
    gb, _ = sensitivity.gradient(listed, q, params, observables.pressure, rattler, solve)
    assert relative_error(gb["diameter"], ga["diameter"]) < 1e-10


def test_overflow_is_detected_and_the_chunk_redone(monkeypatch):
    system = systems.get("bidisperse").build(n=128, dim=2, phi=0.9)
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    table = relax.Table(system, params)
    x0 = jnp.asarray(system.positions)
    nbrs = table.allocate(x0)
    # The same capacity cannot hold a denser configuration: flagged, not truncated silently.
    assert bool(table.build(x0 * 0.5, nbrs.idx.shape[1], nbrs.cells.shape[1]).overflow)
    reference = relax.relax(system, params, chunk=200)
    # A first table with almost no room (3 neighbors), then a first pair list
    # with room for 10 pairs: relax must redo its chunk on bigger ones and
    # reach the same minimum, step for step, as a run that never overflowed.
    for method, too_small in (("capacities", (3, 0)), ("pair_capacity", 10)):
        original, first = getattr(relax.Table, method), []

        def sized(self, *args, original=original, first=first, too_small=too_small, **kwargs):
            if not first:  # the first one overflows at its first build in the loop
                first.append(True)
                return too_small
            return original(self, *args, **kwargs)

        monkeypatch.setattr(relax.Table, method, sized)
        relax._CACHE.clear()
        out = relax.relax(system, params, chunk=200)
        monkeypatch.setattr(relax.Table, method, original)
        assert bool(out.info.converged) and out.stats.reallocations >= 1, method
        assert int(out.info.steps) == int(reference.info.steps), method
        np.testing.assert_allclose(np.asarray(out.x), np.asarray(reference.x), atol=1e-12)


@pytest.mark.usefixtures("compile_fresh")
def test_second_relaxation_compiles_nothing():
    system = systems.get("bidisperse").build(n=64, dim=2, phi=0.9)
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    first = relax.relax(system, params)
    # New parameter values, a warm start: the compiled chunk is reused.
    other = dict(params, diameter=params["diameter"] * 1.001)
    second = relax.relax(system, other, x0=first.x)
    assert bool(second.info.converged) and second.compile_s < 0.1 * first.compile_s


def test_fire_stops_after_too_many_uphill_steps():
    # FIRE 2.0's N_P− rule: a minimizer that never goes downhill gives up.
    system = systems.get("bidisperse").build(n=16, dim=2, phi=0.9)
    mini = minimize.fire(system.energy_real, minimize.periodic_shift, n_neg_max=3)
    state = mini.init(jnp.asarray(system.positions), system.params)
    state = state._replace(v=-state.force)  # power F·v < 0 at every step from here
    for _ in range(4):
        state = mini.step(state._replace(v=-state.force), system.params)
    assert bool(mini.stalled(state))


def test_job_neighbor_list_path_runs():
    result = execute(Job(overrides={"n": "64"}, neighbor_list=True, wrt=["diameter[1]"]))
    assert result.converged and result.meta["neighbor_list"]["pairs"] > 0
    assert np.all(np.isfinite(np.asarray(result.sensitivity["diameter[1]"].values["position"])))


def test_newton_polish_reaches_a_minimum_with_fewer_minimizer_steps():
    # Hand over at max|F| < 1e-6: damped Newton steps on the table's pair Hessian
    # finish to 1e-10. The result is a minimum of the same energy (the force,
    # recomputed from all pairs, is below ftol; no Newton step climbed), reached
    # in fewer minimizer steps than FIRE alone needs.
    system = systems.get("bidisperse").build(n=128, dim=2, phi=0.9, seed=2)
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    plain = relax.relax(system, params, ftol=1e-10)
    polished = relax.relax(system, params, ftol=1e-10, polish=1e-6)
    assert bool(polished.info.converged)
    assert polished.stats.newton_steps >= 1 and polished.stats.cg_iterations > 0
    f = -jax.grad(system.energy_real)(polished.x, params)
    assert float(jnp.max(jnp.linalg.norm(f, axis=1))) < 1e-10
    assert int(polished.info.steps) < int(plain.info.steps)
    assert float(polished.info.energy) <= float(plain.info.energy) * (1 + 1e-6)


def test_specialised_exponent_is_not_reused_for_another_value():
    # The soft-sphere α is a constant of the compiled loop (System.specialize):
    # relaxing the same system at α = 2 and then 5/2 must use each value, as
    # the energy's own gradient (α traced) at each result shows.
    system = systems.get("bidisperse").build(n=48, dim=2, phi=0.9, seed=2)
    assert "alpha" in system.specialize
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    for alpha in (2.0, 2.5):
        theta = {**params, "alpha": jnp.asarray(alpha)}
        out = relax.relax(system, theta, ftol=1e-11)
        assert bool(out.info.converged), alpha
        force = -jax.grad(system.energy_real)(out.x, theta)
        assert float(minimize.max_force(force)) < 1e-10, alpha


def test_relaxation_renumbered_in_cell_order_returns_the_model_numbering(monkeypatch):
    # Large systems relax with their particles renumbered in cell order. Forced
    # here at N = 600 (a cell list, 5 × 5 cells), with unequal species placed
    # at random: a species or index mixed up between the two numberings leaves
    # forces at the returned x, a table that is not the one of x, or a
    # resumed run that does not retrace.
    monkeypatch.setattr(relax, "SORT_THRESHOLD", 0)
    system = systems.get("bidisperse").build(n=600, dim=2, phi=0.88, seed=2)
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    table = relax.Table(system, params)
    assert table.cell_list
    order = relax.spatial_order(table, jnp.mod(jnp.asarray(system.positions), params["box"]))
    assert not np.array_equal(order, np.arange(system.n))  # the numbering really changes
    saved = []
    out = relax.relax(system, params, chunk=400, checkpoint=saved.append, checkpoint_every=0.0)
    assert bool(out.info.converged)
    q = system.to_solver(out.x, params)
    force = -jax.grad(system.energy)(q, params) / params["box"]  # all pairs, the model's numbering
    assert float(jnp.max(jnp.linalg.norm(force, axis=1))) < 1e-9
    assert abs(float(system.energy(q, params)) - float(out.info.energy)) < 1e-12 * float(out.info.energy)
    # The table (built where the loop last rebuilt it) holds every pair within
    # its own interaction range at x* (the sum of the two radii), and only pairs
    # that moved less than the skin out of their reach.
    idx = np.asarray(out.idx)
    rows = [set(row[row < system.n]) for row in idx]
    radius = np.asarray(system.radius({k: np.asarray(v) for k, v in params.items()}))
    inner = _brute_force(system, out.x, params, radius[:, None] + radius[None, :])
    outer = _brute_force(system, out.x, params, radius[:, None] + radius[None, :] + 2 * table.skin)
    assert all(a <= row <= b for a, row, b in zip(inner, rows, outer))
    # A table of one reach would hold every pair within the largest cutoff; this
    # one leaves out pairs of small particles beyond their own reach.
    assert any(u - row for u, row in zip(_brute_force(system, out.x, params, table.cutoff), rows))
    assert all(np.all(np.diff(row) >= 0) for row in idx)
    # A checkpoint is in the model's numbering and carries the order it ran in.
    middle = saved[len(saved) // 2]
    assert 0 < int(middle["step"]) < int(out.info.steps)
    np.testing.assert_array_equal(np.sort(middle["order"]), np.arange(system.n))
    resumed = relax.relax(system, params, chunk=400, resume=middle)
    assert int(resumed.info.steps) == int(out.info.steps)
    np.testing.assert_array_equal(np.asarray(resumed.x), np.asarray(out.x))
