"""The factorization analysed beside the relaxation (mdsens/sparse.py, "analysed ahead";
mdsens/relax.py's ``snapshot``): the pattern predicted on the host is the derivative's own
at x*, a factorization refactors in a prepared analysis only where its pattern is exactly
the prepared one and then gives the same numbers bit for bit, the snapshots change no step
of the relaxation, and a run's derivative is the same with and without it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdsens import job as _job
from mdsens import relax, sensitivity, sparse, systems

from helpers import relaxed

pytest.importorskip("cvxopt")


@pytest.fixture(autouse=True)
def _clean():
    sparse.clear_prepared()
    sparse.clear_cache()
    yield
    sparse.clear_prepared()


def _live_pattern(system, q, params, rattler):
    """The held–held pairs whose Hessian block does not vanish, as the solve's blocks say."""
    k, i, j = system.held_only(rattler).pair_hessians(q, params)
    k, i, j = np.asarray(k), np.asarray(i), np.asarray(j)
    live = np.any(k.reshape(k.shape[0], -1) != 0, axis=1)
    return {(min(a, b), max(a, b)) for a, b in zip(i[live], j[live])}


@pytest.mark.parametrize("family, config", [
    ("bidisperse", dict(seed=1, n=32, dim=2, phi=0.86)),  # with rattlers
    ("bidisperse", dict(seed=1, n=24, dim=3, phi=0.75)),
    ("lj_crystal", dict()),  # no radii, no contact rule: the cutoff decides
])
def test_predicted_pattern_is_the_derivative_s(family, config):
    system, q, params, rattler = relaxed(family, **config)
    held, i, j = sparse.predicted_pattern(system, np.asarray(q), params)
    np.testing.assert_array_equal(held, ~np.asarray(rattler))
    both = held[i] & held[j]
    predicted = {(min(a, b), max(a, b)) for a, b in zip(i[both], j[both])}
    assert predicted == _live_pattern(system, q, params, rattler)


def _problem(seed=2, n=30, d=3, rattlers=(4, 17)):
    """Blocks on a ring plus chords (positive definite), a rattler mask, the translations."""
    rng = np.random.default_rng(seed)
    i = np.concatenate([np.arange(n), rng.integers(0, n, n)])
    j = np.concatenate([(np.arange(n) + 1) % n, rng.integers(0, n, n)])
    # no pair twice (as in a run's pair list; a pair listed twice is summed, and then never
    # filled through the prepared matrix: tested below)
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    _, first = np.unique(lo * n + hi, return_index=True)
    keep = np.zeros(i.size, bool)
    keep[first] = True
    keep &= i != j
    i, j = i[keep].astype(np.int32), j[keep].astype(np.int32)
    g = rng.standard_normal((i.size, d, d))
    k = g @ np.swapaxes(g, 1, 2) + 0.5 * np.eye(d)
    held = np.ones(n, bool)
    held[list(rattlers)] = False
    modes = np.zeros((n, d, d))
    for a in range(d):
        modes[held, a, a] = 1.0 / np.sqrt(held.sum())
    place = rng.random((n, d))
    return k, i, j, held, modes, place, np.ones(d)


@pytest.mark.parametrize("ordering", ["auto", "geometric"])
def test_a_prepared_analysis_serves_exactly_its_pattern_bit_for_bit(ordering, monkeypatch):
    monkeypatch.setattr(sparse, "ORDERING", ordering)
    monkeypatch.setattr(sparse, "PREPARED_LIMIT", 2)  # the match found behind another analysis
    k, i, j, held, modes, place, sides = _problem()
    rows = np.random.default_rng(5).standard_normal((2,) + place.shape)
    plain = sparse._Factor(k, i, j, held, modes, place, sides).solve(rows)

    # the pairs in another order: the same pattern (kept after another one, as an earlier
    # snapshot leaves it), the matrix built anew
    sparse.prepare(held, i[2:], j[2:], 3, place, sides)
    shuffle = np.random.default_rng(0).permutation(i.size)
    assert sparse.prepare(held, j[shuffle], i[shuffle], 3, place, sides)
    assert len(sparse._PREPARED) == 2
    ahead, refilled = sparse.STATS["ahead"], sparse.STATS["refilled"]
    got = sparse._Factor(k, i, j, held, modes, place, sides).solve(rows)
    assert sparse.STATS["ahead"] == ahead + 1 and sparse.STATS["refilled"] == refilled
    np.testing.assert_array_equal(got, plain)
    assert len(sparse._PREPARED) == 1  # taken: its factor now belongs to that factorization
    sparse.clear_prepared()
    # in the factorization's own order (as predicted_pattern lists a run's pairs): the
    # prepared matrix is filled with the values instead of built
    assert sparse.prepare(held, i, j, 3, place, sides)
    got = sparse._Factor(k, i, j, held, modes, place, sides).solve(rows)
    assert sparse.STATS["ahead"] == ahead + 2 and sparse.STATS["refilled"] == refilled + 1
    np.testing.assert_array_equal(got, plain)
    # a pair listed twice (its blocks summed): analysed ahead, but the matrix built anew
    twice_i, twice_j = np.concatenate([i, i[:1]]), np.concatenate([j, j[:1]])
    k2 = np.concatenate([k, k[:1]])
    twice = sparse._Factor(k2, twice_i, twice_j, held, modes, place, sides).solve(rows)
    assert sparse.prepare(held, twice_i, twice_j, 3, place, sides)
    got = sparse._Factor(k2, twice_i, twice_j, held, modes, place, sides).solve(rows)
    assert sparse.STATS["ahead"] == ahead + 3 and sparse.STATS["refilled"] == refilled + 1
    np.testing.assert_array_equal(got, twice)
    ahead += 2  # from here on, nothing is taken

    # a pattern with a pair less, another held mask: not used, the answer unchanged
    sparse.prepare(held, i[1:], j[1:], 3, place, sides)
    other = held.copy()
    other[0] = False
    sparse.prepare(other, i, j, 3, place, sides)
    got = sparse._Factor(k, i, j, held, modes, place, sides).solve(rows)
    assert sparse.STATS["ahead"] == ahead + 1
    np.testing.assert_array_equal(got, plain)

    if ordering == "geometric":
        # prepared from other positions: the geometric ordering of these differs, so the
        # factorization orders and analyses itself (the answer never depends on the snapshot)
        sparse.clear_prepared()
        elsewhere = np.random.default_rng(9).random(place.shape)
        sparse.prepare(held, i, j, 3, elsewhere, sides)
        got = sparse._Factor(k, i, j, held, modes, place, sides).solve(rows)
        assert sparse.STATS["ahead"] == ahead + 1
        np.testing.assert_array_equal(got, plain)


def test_prepare_keeps_the_latest_and_a_superlu_run_prepares_nothing(monkeypatch):
    k, i, j, held, modes, place, sides = _problem()
    for cut in range(sparse.PREPARED_LIMIT + 2):
        assert sparse.prepare(held, i[cut:], j[cut:], 3)
    assert len(sparse._PREPARED) == sparse.PREPARED_LIMIT
    monkeypatch.setattr(sparse, "BACKEND", "superlu")
    sparse.clear_prepared()
    assert not sparse.prepare(held, i, j, 3)
    assert not sparse._PREPARED


def test_snapshots_change_no_step_and_come_in_the_model_s_numbering(monkeypatch):
    """A cell-list relaxation renumbered in cell order (the threshold lowered to this N):
    with a snapshot hook it takes the same steps to the same positions, its chunks near the
    end are at most SNAPSHOT_CHUNK steps, and the last snapshot is x* itself, in the model's
    numbering."""
    monkeypatch.setattr(relax, "SORT_THRESHOLD", 512)
    monkeypatch.setattr(relax, "SNAPSHOT_CHUNK", 60)
    system = systems.get("bidisperse").build(n=512, seed=3)
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    plain = relax.relax(system, params, chunk=400)
    snaps, steps = [], []
    out = relax.relax(system, params, chunk=400, callback=lambda s, f, t: steps.append((s, f)),
                      snapshot=lambda x, f: snaps.append((np.array(x), f)))
    assert int(out.info.steps) == int(plain.info.steps)
    np.testing.assert_array_equal(np.asarray(out.x), np.asarray(plain.x))
    # after a chunk that ended below SNAPSHOT_NEAR (max|F| is not monotone under FIRE) the
    # next is at most SNAPSHOT_CHUNK steps
    after_near = [b - a for (a, f), (b, _) in zip(steps, steps[1:]) if f < relax.SNAPSHOT_NEAR]
    assert len(after_near) >= 2 and max(after_near) <= 60
    assert len(snaps) == sum(f < relax.SNAPSHOT_NEAR for _, f in steps)
    assert all(f < relax.SNAPSHOT_NEAR for _, f in snaps)
    np.testing.assert_array_equal(snaps[-1][0], np.asarray(out.x))


def test_a_run_s_derivative_is_the_same_with_the_analysis_ahead(monkeypatch):
    """`mdsens run --solver sparse`: the relaxation's last positions prepare the
    factorization (used: the contact network was already x*'s), and the derivatives are
    those of a run without it, bit for bit."""
    def run():
        job = _job.Job(system="bidisperse", overrides={"n": "128"}, seed=0, solver="sparse", chunk=50,
                       grad=["pressure"])
        return _job.execute(job)

    before, refilled = sparse.STATS["ahead"], sparse.STATS["refilled"]
    ahead = run()
    assert sparse.STATS["ahead"] == before + 1
    assert sparse.STATS["refilled"] == refilled + 1  # the prediction lists the pairs in the run's order
    assert not sparse._PREPARED
    monkeypatch.setattr(sparse.Ahead, "offer", lambda self, x, f: None)
    sparse.clear_cache()
    plain = run()
    assert sparse.STATS["ahead"] == before + 1
    np.testing.assert_array_equal(np.asarray(ahead.q), np.asarray(plain.q))
    for name in ahead.sensitivity:
        for key, value in ahead.sensitivity[name].values.items():
            np.testing.assert_array_equal(np.asarray(value), np.asarray(plain.sensitivity[name].values[key]))
    a, p = ahead.gradient["pressure"][0], plain.gradient["pressure"][0]
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(p[key]))
