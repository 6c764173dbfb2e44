"""mdsens.driver.drive, the host loop of every relaxation, alone: fake chunks
in pure Python (no compile), each test naming one behaviour of the loop."""

from __future__ import annotations

import pytest

from mdsens import driver
from mdsens.driver import Chunk


class Fake:
    """A chunk that advances an integer state (its step) up to ``until``; the
    table is an integer width. ``overflows``: how many calls overflow first
    (their state is garbage, to catch a redo that does not start over);
    ``stall_at`` / ``converge_at``: the step at which the chunk reports a
    stall / convergence (and stops there)."""

    def __init__(self, overflows=0, stall_at=None, converge_at=None, diverge_at=None, regrid_at=None):
        self.overflows, self.stall_at, self.converge_at = overflows, stall_at, converge_at
        self.diverge_at, self.regrid_at = diverge_at, regrid_at
        self.calls: list[tuple] = []  # (state, table, until, stale) of every run
        self.compiles: list = []  # the tables program() was asked for
        self.widened: list[tuple] = []
        self.callbacks: list[tuple] = []
        self.saved: list[int] = []

    def program(self, state, table, until, stale):
        first = table not in self.compiles
        if first:
            self.compiles.append(table)
        return self.run, (1.0 if first else 0.0)

    def run(self, state, table, until, stale):
        self.calls.append((state, table, until, stale))
        assert len(self.calls) < 100, "the loop does not stop"
        if self.overflows:
            self.overflows -= 1
            return Chunk(-999, table, -999, overflow=True, rebuilds=7)
        stops = [s for s in (self.stall_at, self.converge_at, self.diverge_at, self.regrid_at)
                 if s is not None and state < s <= until]
        end = min(stops) if stops else until
        return Chunk(end, table, end, converged=end == self.converge_at, stalled=end == self.stall_at,
                     diverged=end == self.diverge_at, regrid=end == self.regrid_at, rebuilds=1)

    def widen(self, state, table, report, attempt):
        self.widened.append((state, table, attempt))
        return table + 1

    def callback(self, report, elapsed):
        self.callbacks.append((report.step, elapsed))

    def checkpoint(self, state, table):
        self.saved.append(state)


def test_an_overflowed_chunk_is_redone_from_its_start_on_a_wider_table():
    fake = Fake(overflows=2, converge_at=150)
    out = driver.drive(0, 10, fake.program, fake.widen, chunk=100, max_steps=1000)
    # three tries of the first chunk, each from step 0 with the same bound, the table widened between
    assert [c[:3] for c in fake.calls[:3]] == [(0, 10, 100), (0, 11, 100), (0, 12, 100)]
    assert fake.widened == [(0, 10, 1), (0, 11, 2)]
    # a new table is built by the chunk (stale); an accepted chunk's table is not
    assert [c[3] for c in fake.calls] == [True, True, True, False]
    assert out.reallocations == 2 and out.state == 150 and out.table == 12
    # the redone chunks' rebuilds are not counted; the accepted chunks' are
    assert out.rebuilds == 2
    # one compile per new table: three tables, 1 s each
    assert out.compile_s == 3.0


def test_twenty_one_overflows_raise_naming_the_overflow():
    fake = Fake(overflows=21)
    with pytest.raises(RuntimeError, match="overflowed 20 times"):
        driver.drive(0, 10, fake.program, fake.widen, chunk=100, max_steps=1000)
    assert len(fake.calls) == 21 and len(fake.widened) == 20


def test_twenty_overflows_are_still_recovered():
    fake = Fake(overflows=20, converge_at=50)
    out = driver.drive(0, 10, fake.program, fake.widen, chunk=100, max_steps=1000)
    assert out.reallocations == 20 and out.last.converged and out.table == 30


def test_callback_once_per_accepted_chunk_with_its_step():
    fake = Fake(overflows=1)
    driver.drive(0, 10, fake.program, fake.widen, chunk=100, max_steps=350, callback=fake.callback)
    assert [step for step, _ in fake.callbacks] == [100, 200, 300, 350]


def test_elapsed_leaves_out_compile_time():
    ticks = iter(range(100))
    fake = Fake()
    driver.drive(0, 10, fake.program, fake.widen, chunk=100, max_steps=200, callback=fake.callback,
                 clock=lambda: float(next(ticks)))
    # clock: 0 at the start, then 1 and 2 at the two callbacks; the first chunk's compile "took" 1 s
    assert [e for _, e in fake.callbacks] == [0.0, 1.0]


def test_stops_at_max_steps_with_the_last_chunk_cut_short():
    fake = Fake()
    out = driver.drive(0, 10, fake.program, fake.widen, chunk=100, max_steps=250)
    assert [c[2] for c in fake.calls] == [100, 200, 250]
    assert out.state == 250 and not out.last.converged


def test_starts_from_a_resumed_step():
    fake = Fake()
    driver.drive(120, 10, fake.program, fake.widen, chunk=100, max_steps=300, step=120)
    assert [c[2] for c in fake.calls] == [220, 300]


def test_stops_on_stall():
    fake = Fake(stall_at=230)
    out = driver.drive(0, 10, fake.program, fake.widen, chunk=100, max_steps=10_000)
    assert len(fake.calls) == 3 and out.state == 230 and out.last.stalled


def test_stops_on_convergence():
    fake = Fake(converge_at=130)
    out = driver.drive(0, 10, fake.program, fake.widen, chunk=100, max_steps=10_000)
    assert len(fake.calls) == 2 and out.state == 130 and out.last.converged


def test_stops_when_the_force_is_not_finite():
    fake = Fake(diverge_at=170)
    out = driver.drive(0, 10, fake.program, fake.widen, chunk=100, max_steps=10_000)
    assert len(fake.calls) == 2 and out.state == 170


def test_a_diverged_overflow_stops_instead_of_widening():
    fake = Fake()

    def run(state, table, until, stale):
        fake.calls.append(state)
        if state >= 100:
            return Chunk(state + 5, table, state + 5, overflow=True, diverged=True)
        return Chunk(until, table, until)

    out = driver.drive(0, 10, lambda *a: (run, 0.0), fake.widen, chunk=100, max_steps=10_000,
                       callback=fake.callback)
    assert fake.widened == [] and out.reallocations == 0 and out.state == 105
    assert [s for s, _ in fake.callbacks] == [100]  # the diverged chunk is not reported as progress


def test_settle_resizes_once_after_the_first_chunk():
    fake = Fake()
    resized = []

    def resize(state, table):
        resized.append((state, table))
        return 5

    out = driver.drive(0, 10, fake.program, fake.widen, chunk=1000, max_steps=2500, settle=300, resize=resize)
    assert resized == [(300, 10)]
    # the first chunk settle steps long, then chunk-long ones on the resized (new, stale) table
    assert [c[1:] for c in fake.calls] == [(10, 300, True), (5, 1300, True), (5, 2300, False), (5, 2500, False)]
    assert out.table == 5


def test_settle_keeps_the_table_when_resize_declines():
    fake = Fake()
    resized = []
    driver.drive(0, 10, fake.program, fake.widen, chunk=1000, max_steps=1500, settle=300,
                 resize=lambda s, t: resized.append(s))
    assert resized == [300] and [c[1:] for c in fake.calls] == [(10, 300, True), (10, 1300, False),
                                                                 (10, 1500, False)]


def test_no_resize_when_the_first_chunk_finishes():
    fake = Fake(converge_at=200)
    driver.drive(0, 10, fake.program, fake.widen, chunk=1000, max_steps=5000, settle=300,
                 resize=lambda s, t: pytest.fail("resized after the stop"))
    assert len(fake.calls) == 1


def test_regrid_keeps_the_state_and_starts_a_new_table():
    fake = Fake(regrid_at=60)
    grids = []

    def regrid(report):
        grids.append(report.state)
        fake.regrid_at = None
        return 99

    out = driver.drive(0, 10, fake.program, fake.widen, chunk=100, max_steps=250, regrid=regrid,
                       callback=fake.callback)
    assert grids == [60]
    # the next chunk goes on from step 60 on the new, stale table; no callback for the regrid
    assert [c for c in fake.calls] == [(0, 10, 100, True), (60, 99, 160, True), (160, 99, 250, False)]
    assert [s for s, _ in fake.callbacks] == [160, 250]
    assert out.rebuilds == 3 and out.reallocations == 0


def test_checkpoints_periodically_and_where_the_budget_ran_out_never_when_converged():
    ticks = iter(range(1000))
    fake = Fake()
    driver.drive(0, 10, fake.program, fake.widen, chunk=100, max_steps=500, checkpoint=fake.checkpoint,
                 checkpoint_every=2.0, clock=lambda: float(next(ticks)))
    # clock 0 at the start, one tick per chunk (and one per save): every other chunk, and at the end
    assert fake.saved == [200, 400, 500]
    fake = Fake(converge_at=150)
    driver.drive(0, 10, fake.program, fake.widen, chunk=100, max_steps=500, checkpoint=fake.checkpoint,
                 checkpoint_every=0.0)
    assert fake.saved == [100]  # the converged end is not a checkpoint


def test_compiled_caches_and_times_the_first_compile_only():
    cache, lowered = {}, []

    class Lowered:
        def compile(self):
            return "executable"

    def lower():
        lowered.append(1)
        return Lowered()

    first = driver.compiled(cache, "k", lower)
    second = driver.compiled(cache, "k", lower)
    assert first[0] == second[0] == "executable" and len(lowered) == 1
    assert first[1] >= 0.0 and second[1] == 0.0
