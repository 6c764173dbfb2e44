"""Inverse design (`mdsens design`, mdsens/design.py) and the poisson_ratio observable.

The Poisson ratio formula is checked against uniaxial stress on an isotropic
tensor; its derivatives (forward and reverse) and the design's loss gradient
against central differences of re-relaxed states (tests/helpers.Reference),
not against anything the design module computes itself."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import Reference, assert_close, relaxed, unit
from mdsens import design, elasticity, io, observables, relax, sensitivity, systems
from mdsens.cli import app
from mdsens.job import Job

cli = CliRunner()
POLY_16 = dict(n=16, dim=2, phi=0.9, spread=0.2)
_COMMON = ["design", "polydisperse", "--set", "n=16", "--vary", "diameter", "--keep", "phi", "--steps", "5",
           "--seed", "3", "--json"]
# 16 polydisperse disks at fixed φ: pressure (0.024 at the start) towards 0.05, and ν (0.63) towards 0.55.
DESIGN_PRESSURE = [*_COMMON, "--target", "pressure=0.05", "--lr", "0.01", "--observe", "energy"]
DESIGN_NU = [*_COMMON, "--target", "poisson_ratio=0.55", "--lr", "0.003"]


def _isotropic(lam: float, mu: float, d: int) -> np.ndarray:
    eye = np.eye(d)
    return (lam * np.einsum("ij,kl->ijkl", eye, eye)
            + mu * (np.einsum("ik,jl->ijkl", eye, eye) + np.einsum("il,jk->ijkl", eye, eye)))


@pytest.mark.parametrize("d", [2, 3])
def test_poisson_ratio_is_uniaxial_strain_ratio(d):
    """ν = −ε_yy/ε_xx under uniaxial stress σ = e_x e_xᵀ, from the compliance
    of an isotropic C (Lamé λ, μ), solved numerically: independent of the
    closed forms (B − G)/(B + G) and (3B − 2G)/(2(3B + G))."""
    for lam, mu in [(1.3, 0.4), (-0.2, 1.0), (5.0, 0.05)]:
        c = _isotropic(lam, mu, d)
        stress = np.zeros((d, d))
        stress[0, 0] = 1.0
        strain = np.linalg.lstsq(c.reshape(d * d, d * d), stress.ravel(), rcond=None)[0].reshape(d, d)
        expected = -strain[1, 1] / strain[0, 0]
        nu = observables.poisson_ratio_of(elasticity.bulk_modulus_of(jnp.asarray(c)),
                                          elasticity.shear_modulus_of(jnp.asarray(c)), d)
        # A 4x4 / 9x9 least-squares solve of a well-conditioned system: round-off.
        assert float(nu) == pytest.approx(expected, rel=1e-12, abs=1e-13)


@pytest.fixture(scope="module")
def poly16():
    system, q, params, rattler = relaxed("polydisperse", **POLY_16)
    return system, q, params, rattler, Reference(system, q, params, rattler)


@pytest.mark.slow  # long (over a minute on 2 cores); `pytest -m slow`
def test_poisson_ratio_value_and_forward_derivative(poly16):
    system, q, params, rattler, reference = poly16
    c = observables.elastic_tensor(system, q, params)
    b, g = elasticity.bulk_modulus_of(c), elasticity.shear_modulus_of(c)
    nu = float(observables.poisson_ratio(system, q, params))
    assert nu == pytest.approx(float((b - g) / (b + g)), rel=1e-12)
    assert -1.0 < nu < 1.0  # the 2D bounds of a stable isotropic solid
    observe = {"poisson_ratio": observables.poisson_ratio}
    # dν/dα through the equilibrium's tangent and the moduli's solves.
    result = sensitivity.forward(system, q, params, "alpha", observe, rattler)
    fd = reference.directional(unit(params, "alpha"), observe=observe)
    # As for the moduli (tests/test_observables.py): CG error amplified by 1/(2h), bound 1e-5.
    assert_close(result.values["poisson_ratio"], fd["poisson_ratio"], rtol=1e-5, what="dnu/dalpha")


@pytest.mark.slow
def test_poisson_ratio_reverse_gradient(poly16):
    """dν/dθ for every parameter in one reverse pass, along a random direction."""
    system, q, params, rattler, reference = poly16
    observe = {"poisson_ratio": observables.poisson_ratio}
    grad, _ = sensitivity.gradient(system, q, params, observables.poisson_ratio, rattler)
    rng = np.random.default_rng(5)
    direction = {k: jnp.asarray(rng.normal(size=np.shape(v))) for k, v in params.items()}
    predicted = sum(float(jnp.sum(grad[k] * direction[k])) for k in params)
    expected = reference.directional(direction, observe=observe)["poisson_ratio"]
    assert_close(predicted, expected, rtol=1e-5, what="reverse dnu")


def _shared_run(tmp_path_factory, worker_id, name, args):
    """Run ``mdsens`` once per test session, shared by the xdist workers
    (the second-order programs take tens of seconds to compile)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent
    out, log = root / f"{name}.h5", root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not log.exists():
            result = cli.invoke(app, [*args, "-o", str(out)])
            log.write_text(json.dumps({"exit_code": result.exit_code, "stdout": result.stdout,
                                       "output": result.output}))
    return json.loads(log.read_text()), out


@pytest.fixture
def pressure_run(tmp_path_factory, worker_id):
    return _shared_run(tmp_path_factory, worker_id, "design-pressure", DESIGN_PRESSURE)


@pytest.fixture
def nu_run(tmp_path_factory, worker_id):
    return _shared_run(tmp_path_factory, worker_id, "design-nu", DESIGN_NU)


def _check_file(run, target_name, target):
    result, out = run
    assert result["exit_code"] == 0, result["output"]
    summary = json.loads(result["stdout"])
    record = io.read(out)
    trajectory = record["design"]
    k = summary["steps"]
    assert k == 5
    assert trajectory["loss"].shape == (k,)
    assert trajectory["diameter"].shape == (k, 16)
    values = trajectory["observables"][target_name]
    assert values.shape == (k,)
    # The loss is the squared relative error (recomputed here from the recorded values).
    assert_close(trajectory["loss"], ((values - target) / target) ** 2, rtol=1e-12)
    assert trajectory["loss"][-1] < 0.5 * trajectory["loss"][0]
    # The packing written is the row of the lowest loss.
    best = trajectory["attrs"]["best_step"]
    assert best == int(np.argmin(trajectory["loss"]))
    assert_close(record["parameters"]["diameter"], trajectory["diameter"][best], rtol=0)
    assert float(record["observables"][target_name]) == values[best]
    # φ held: the box follows Σ(π D²/4)/φ, computed here from the recorded diameters.
    phi = np.sum(np.pi * trajectory["diameter"] ** 2 / 4, axis=1) / np.prod(trajectory["box"], axis=1)
    assert_close(phi, np.full(k, 0.9), rtol=1e-12)
    attrs = trajectory["attrs"]
    # Compile once: one loss program and one relaxation system for the whole design.
    assert attrs["compiles"] == {"loss": 1, "relax_system": 1}
    assert summary["contact_changes"] == attrs["contact_changes"] >= 0
    # The gradient checks: every 10th step (here step 0) and the last, all passing.
    checks = trajectory["fd_check"]
    assert list(checks["step"]) == [0, k - 1]
    assert np.all(checks["passed"]) and np.all(checks["relative_error"] < design.FD_RTOL)
    assert np.all(np.abs(checks["directional"]) > 0)
    return record


def _independent_gradient_check(out, name, target):
    """The recorded dℒ/dD at the final state along a random direction v, against
    central differences (Newton re-relaxation, tests/helpers.Reference) of
    ℒ = ((O − t)/t)² with the box moved as φ requires:
    dL = L (Σ dv_i)/(d Σ v_i), v_i = π D_i²/4."""
    record = io.read(out)
    system = systems.get("from_file").build(path=str(out))
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    q = system.to_solver(jnp.asarray(record["positions"]), params)
    reference = Reference(system, q, params, observables.rattlers(system, q, params))
    v = np.random.default_rng(11).normal(size=16)
    d, box = np.asarray(params["diameter"]), np.asarray(params["box"])
    d_box = box * np.sum(np.pi * d * v / 2) / (2 * np.sum(np.pi * d**2 / 4))
    fd = reference.directional({"diameter": jnp.asarray(v), "box": jnp.asarray(d_box)},
                               observe={name: observables.OBSERVABLES[name]})[name]
    value = float(record["observables"][name])
    expected = 2 * (value - target) / target**2 * fd
    predicted = float(np.sum(record["design"]["gradient"]["diameter"] * v))
    return predicted, expected


def _relax_again(out, names):
    """The final state re-built from the file and relaxed again reproduces the
    file's observables (it is a minimum: the relaxation barely moves it)."""
    record = io.read(out)
    system = systems.get("from_file").build(path=str(out))
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    q, info = sensitivity.relax(system, params, ftol=1e-10)
    assert bool(info.converged)
    for name in names:
        again = jax.jit(lambda q_, p_, f=observables.OBSERVABLES[name]: f(system, q_, p_))(q, params)
        assert float(again) == pytest.approx(float(record["observables"][name]), rel=1e-8), name


def test_design_pressure_file_trajectory_and_checks(pressure_run):
    _check_file(pressure_run, "pressure", 0.05)


def test_design_pressure_gradient_against_finite_differences(pressure_run):
    predicted, expected = _independent_gradient_check(pressure_run[1], "pressure", 0.05)
    # Pressure needs no inner solve: FD error O(h²) + round-off/h, ~1e-9 measured scale; 1e-6 bound.
    assert_close(predicted, expected, rtol=1e-6)


def test_design_pressure_final_state_relaxes_to_the_reported_observables(pressure_run):
    _relax_again(pressure_run[1], ["pressure", "energy"])


@pytest.mark.slow
def test_design_poisson_ratio(nu_run):
    """ν of 16 disks from 0.63 towards 0.55: the file, the recorded checks, the
    final gradient against independent differences, and `mdsens run` on the file."""
    record = _check_file(nu_run, "poisson_ratio", 0.55)
    predicted, expected = _independent_gradient_check(nu_run[1], "poisson_ratio", 0.55)
    # The moduli's CG error amplified by 1/(2h): bound 1e-5 as in test_observables.
    assert_close(predicted, expected, rtol=1e-5)
    rerun = nu_run[1].parent / "design-nu-rerun.h5"
    result = cli.invoke(app, ["run", "from_file", "--set", f"path={nu_run[1]}", "--observe", "poisson_ratio",
                              "--wrt", "epsilon", "-o", str(rerun), "--json", "--force"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["poisson_ratio"] == pytest.approx(
        float(record["observables"]["poisson_ratio"]), rel=1e-8)


def test_design_compiles_once_in_python():
    """Steps 2+ compile nothing: the relaxation's cache holds one table and one
    chunk program for the design's system, and the loss program is compiled once."""
    job = Job(system="polydisperse", overrides={"n": "16"}, seed=3)
    result = design.run(design.Design(job=job, targets={"pressure": 0.05}, vary=["diameter"], steps=4, lr=0.01,
                                      keep="phi", fd_every=None))
    assert result.compiles == {"loss": 1, "relax_system": 1}
    # (the cache is keyed by the model and the options; the design's relaxation system is a model of its own)
    (entries,) = [v for k, v in relax._CACHE.items() if k[0] == result.relax_system.model]
    assert len(entries) == 1 and len(entries[0][1].executables) == 1
    losses = [s.loss for s in result.history]
    assert losses[-1] < losses[0]
    # The physical box moved with the diameters; the relaxation's never did.
    assert not np.allclose(result.final.params["box"], result.history[0].params["box"], rtol=1e-9, atol=0)
    assert result.fd_checks == []


@pytest.mark.parametrize("args, message", [
    (["--target", "nonsense=1", "--vary", "diameter"], "unknown observable"),
    (["--target", "stress=1", "--vary", "diameter"], "scalar"),
    (["--target", "pressure=abc", "--vary", "diameter"], "not a number"),
    (["--target", "pressure=1", "--vary", "nope"], "no parameter"),
    (["--target", "pressure=1", "--vary", "diameter", "--bound", "diameter=2,3"], "excludes the starting value"),
    (["--target", "pressure=1", "--vary", "diameter", "--steps", "0"], "--steps"),
    (["--target", "pressure=1", "--vary", "diameter", "--lr", "-1"], "--lr"),
    (["--target", "pressure=1", "--vary", "diameter", "--optimizer", "lbfgs"], "optimizer"),
    (["--target", "pressure=1"], "--vary"),
    (["--vary", "diameter"], "nothing to design"),
    (["--target", "pressure=1", "--vary", "diameter", "--keep", "pressure"], "needs a system built at fixed pressure"),
    (["--target", "shear_modulus=1", "--vary", "diameter", "--set", "pressure=0.01", "--keep", "phi"], "use --keep pressure"),
    (["--target", "shear_modulus=1", "--vary", "box", "--set", "pressure=0.01"], "the cell relaxes"),
    (["--target", "shear_modulus=1", "--vary", "strain", "--set", "pressure=0.01", "--keep", "pressure"], "the cell relaxes"),
    (["--target", "pressure=1", "--vary", "diameter", "--keep", "volume"], "--keep"),
    (["--target", "pressure=1", "--vary", "diameter", "--check-every", "-1"], "--check-every"),
    (["--target", "pressure=1", "--vary", "diameter", "--max-rise", "-0.5"], "--max-rise"),
    (["--target", "pressure=1", "--vary", "diameter", "--stop-at", "poisson_ratio=0.3"], "--stop-at needs --tol"),
    (["--target", "pressure=1", "--vary", "diameter", "--stop-at", "nonsense=0.3", "--tol", "0.1"], "unknown observable"),
    (["--target", "pressure=1", "--vary", "diameter", "--stop-at", "stress=0.3", "--tol", "0.1"], "scalar"),
    (["--target", "pressure=1", "--vary", "diameter", "--stop-at", "poisson_ratio", "--tol", "0.1"], "--stop-at"),
    (["--target", "pressure=1", "--vary", "diameter", "--set", "pressure=0.01", "--solver", "sparse"],
     "not available at fixed pressure"),
])
def test_bad_input_exits_2_without_a_file(tmp_path, args, message):
    out = tmp_path / "bad.h5"
    result = cli.invoke(app, ["design", "polydisperse", "--set", "n=16", *args, "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_existing_output_is_not_overwritten(tmp_path):
    out = tmp_path / "exists.h5"
    out.write_bytes(b"keep")
    result = cli.invoke(app, ["design", "--target", "pressure=1", "--vary", "diameter", "-o", str(out)])
    assert result.exit_code == 2 and "--force" in result.output
    assert out.read_bytes() == b"keep"


@pytest.mark.parametrize("every, steps", [(0, []), (2, [0, 2, 3])])
def test_check_every_sets_the_gradient_checks(tmp_path, every, steps):
    """--check-every K: a check at every K-th step and at the last; 0: none at all."""
    out = tmp_path / "checks.h5"
    result = cli.invoke(app, ["design", "polydisperse", "--set", "n=16", "--target", "pressure=0.05", "--vary",
                              "diameter", "--keep", "phi", "--steps", "4", "--lr", "0.002", "--check-every", str(every),
                              "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    checks = io.read(out)["design"]["fd_check"]
    assert [int(k) for k in np.atleast_1d(checks["step"])] == steps
    assert np.all(checks["passed"])
    assert len(json.loads(result.stdout)["fd_check"]) == len(steps)


def test_max_rise_zero_lowers_the_loss_at_every_step_or_accepts_at_the_smallest_rate(tmp_path):
    """--max-rise 0: a step that raises the loss (beyond 1e-3 of the starting loss) is
    retried at half the rate, so every accepted step lowers the loss unless it was taken
    at the smallest rate lr·2^-max_retries. lr 0.05 overshoots the pressure target, so
    rejections happen."""
    out = tmp_path / "strict.h5"
    lr = 0.05
    result = cli.invoke(app, ["design", "polydisperse", "--set", "n=16", "--target", "pressure=0.05", "--vary",
                              "diameter", "--keep", "phi", "--steps", "8", "--lr", str(lr), "--max-rise", "0",
                              "--check-every", "0", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    trajectory = io.read(out)["design"]
    loss, rate = trajectory["loss"], trajectory["learning_rate"]
    floor = 1e-3 * abs(loss[0]) + 1e-14
    smallest = lr * 0.5 ** design.Design().max_retries
    for k in range(1, len(loss)):
        assert loss[k] <= loss[k - 1] + floor or rate[k] == pytest.approx(smallest, rel=1e-12), k
    assert trajectory["attrs"]["rejections"] >= 1
    assert trajectory["attrs"]["max_rise"] == 0


def test_stop_at_stops_at_the_first_step_within_tol_and_writes_it(tmp_path):
    """--target pressure=0.05 as the guide, --stop-at pressure=0.032 --tol 0.1: the
    pressure rises from 0.024 and the design stops at the first step within
    [0.0288, 0.0352], written whatever its loss (here not the lowest reachable)."""
    out = tmp_path / "stop.h5"
    result = cli.invoke(app, ["design", "polydisperse", "--set", "n=16", "--seed", "3", "--target", "pressure=0.05",
                              "--stop-at", "pressure=0.032", "--tol", "0.1", "--vary", "diameter", "--keep", "phi",
                              "--steps", "40", "--lr", "0.002", "--check-every", "0", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    record = io.read(out)
    trajectory = record["design"]
    pressure = np.asarray(trajectory["observables"]["pressure"])
    within = np.abs(pressure - 0.032) <= 0.1 * 0.032
    k = len(pressure)
    assert 1 < k < 40 and within[-1] and not np.any(within[:-1])
    attrs = trajectory["attrs"]
    assert attrs["stopped"] == "stop-at" and attrs["best_step"] == k - 1
    assert attrs["stop_at"] == {"pressure": 0.032}
    assert float(record["observables"]["pressure"]) == pressure[-1]
    assert json.loads(result.stdout)["stopped"] == "stop-at"


def test_keep_phi_box_formula():
    """physical_fn's box for keep=phi against the closed form, in 3D too."""
    plan = design.prepare(design.Design(job=Job(system="polydisperse", overrides={"n": "16", "dim": "3", "phi": "0.3"}),
                                        targets={"pressure": 1.0}, vary=["diameter"], keep="phi"))
    new = np.asarray(plan.base["diameter"]) * np.linspace(0.9, 1.2, 16)
    box = np.asarray(design.physical_fn(plan)({"diameter": jnp.asarray(new)})["box"])
    volume = np.sum(4 / 3 * math.pi * (new / 2) ** 3) / 0.3
    assert_close(box, np.full(3, volume ** (1 / 3)), rtol=1e-13)


def test_plot_draws_a_design_file(pressure_run, tmp_path):
    image = tmp_path / "design.png"
    result = cli.invoke(app, ["plot", str(pressure_run[1]), "-o", str(image)])
    assert result.exit_code == 0, result.output
    assert image.stat().st_size > 10_000


# -- fixed pressure ---------------------------------------------------------------------------

# 16 bidisperse disks at P = 0.01 (iso cell): the packing fraction (0.864 at the start) towards
# 0.9 by the diameters and the pressure itself. The target stays out of reach in 4 steps on
# purpose: dℒ/dθ ∝ (φ − t), and next to the target the relaxation's own error in φ (~1e-10 at
# ftol 1e-10) would be a visible fraction of φ − t (2e-6 relative at φ − t = 8e-5, measured).
DESIGN_AT_PRESSURE = ["design", "bidisperse", "--set", "n=16", "--set", "pressure=0.01", "--keep", "pressure",
                      "--target", "packing_fraction=0.9", "--vary", "diameter", "--vary", "pressure",
                      "--lr", "0.001", "--steps", "4", "--seed", "1", "--json", "--observe", "shear_modulus",
                      "--observe", "pressure"]


@pytest.fixture
def pressure_design(tmp_path_factory, worker_id):
    return _shared_run(tmp_path_factory, worker_id, "design-at-pressure", DESIGN_AT_PRESSURE)


@pytest.mark.slow
def test_design_at_fixed_pressure_gradient_against_independent_differences(pressure_design):
    """--keep pressure: the recorded dℒ/dθ (diameters and P) at the written
    state, along a random direction, against central differences of the loss
    ((φ − t)/t)², φ from an independently written enthalpy re-minimised by
    Newton steps at θ ± hv (tests/test_pressure.Reference: positions and cell)."""
    from test_pressure import Reference as PressureReference

    result, out = pressure_design
    assert result["exit_code"] == 0, result["output"]
    record = io.read(out)
    trajectory = record["design"]
    attrs = trajectory["attrs"]
    assert attrs["keep"] == "pressure"
    best = attrs["best_step"]
    # The relaxed cell is recorded for every step and is the file's box at the written step.
    assert trajectory["box"].shape == (4, 2)
    assert_close(record["box"], trajectory["box"][best], rtol=0)
    # Every step sits at its own target pressure (the varied P), to the relaxation's tolerance.
    pressures = trajectory["pressure"]
    assert pressures.shape == (4,) and not np.allclose(pressures, pressures[0])
    assert float(record["observables"]["pressure"]) == pytest.approx(float(pressures[best]), rel=1e-6)
    # The design's own checks (step 0 and the last) passed.
    assert list(trajectory["fd_check"]["step"]) == [0, 3] and np.all(trajectory["fd_check"]["passed"])

    system = systems.get("bidisperse").build(n=16, pressure=0.01, seed=1)
    params = {k: jnp.asarray(v) for k, v in record["parameters"].items()}
    q = system.to_solver(jnp.asarray(record["positions"]), params)
    reference = PressureReference(system, q, params, observables.rattlers(system, q, params))
    rng = np.random.default_rng(7)
    v = {"diameter": rng.normal(size=2), "pressure": rng.normal() * 0.01}
    h, target = 1e-6, 0.9

    def loss(sign):
        theta = dict(reference.theta)
        theta["diameter"] = theta["diameter"] + sign * h * v["diameter"]
        theta["pressure"] = theta["pressure"] + sign * h * v["pressure"]
        z = reference.newton(reference.z, theta)
        assert float(jnp.max(jnp.abs(reference.grad(z, theta)))) < 1e-11  # a minimum again
        phi = float(reference.observe(z, theta)["packing_fraction"])
        return ((phi - target) / target) ** 2

    expected = (loss(+1) - loss(-1)) / (2 * h)
    gradient = trajectory["gradient"]
    predicted = float(np.sum(gradient["diameter"] * v["diameter"]) + gradient["pressure"] * v["pressure"])
    # Newton to round-off: O(h²) and round-off/h are ~1e-8 relative here; 1e-6 as in test_pressure.
    assert_close(predicted, expected, rtol=1e-6)
    # The pressure's share is not negligible: the cell's response is in the gradient.
    assert abs(float(gradient["pressure"]) * v["pressure"]) > 0.01 * abs(predicted)


@pytest.mark.slow
def test_design_at_fixed_pressure_python(tmp_path):
    """Two steps at fixed pressure from Python (32 s on the loaded 2-core machine, mostly
    compiling the enthalpy relaxation): the loss falls, more pressure shrinks the cell, and
    the record's box is the relaxed cell."""
    # The target lies well above the relaxed φ (~0.87 at P = 0.01): the design must raise P
    # whichever nearby minimum FIRE reaches (at 0.87 it once sat just above the start's φ).
    job = Job(system="bidisperse", overrides={"n": "16", "pressure": "0.01"}, seed=1)
    result = design.run(design.Design(job=job, targets={"packing_fraction": 0.9}, vary=["pressure"], steps=2,
                                      lr=0.002, fd_every=None))
    assert result.plan.design.keep == "pressure"  # implied by the system
    first, last = result.history
    assert last.loss < first.loss
    # Adam's first step is lr·g/(|g| + 1e-8) ≈ lr·sign(g): P goes up by 0.002.
    assert float(last.theta["pressure"]) == pytest.approx(0.012, rel=1e-6)
    assert float(last.values["packing_fraction"]) > float(first.values["packing_fraction"])
    cell = lambda s: float(np.exp(s.params["strain"][0, 0]))  # noqa: E731
    assert cell(last) < cell(first)  # more pressure, a smaller box
    record = result.record()
    assert_close(record["box"], np.asarray(result.plan.system.cell(
        {k: jnp.asarray(v) for k, v in result.history[result.best].params.items()})).diagonal(), rtol=1e-14)


# -- ensembles (--seeds) ----------------------------------------------------------------------


@pytest.mark.slow
def test_design_over_seeds_mean_gradient_against_finite_differences():
    """--seeds 0:3 on 16 bidisperse disks: one shared (D₀, D₁) for the mean of the
    members' losses ((P_m − t)/t)² at fixed φ. The design's gradient at its last
    step along a random direction against central differences of that mean
    loss, each member re-relaxed by Newton at θ ± hv (tests/helpers.Reference),
    the box moved as φ requires (written here: L ∝ (Σ D_i²)^(1/2) in 2D)."""
    job = Job(system="bidisperse", overrides={"n": "16"})
    target = 0.05
    result = design.run(design.Design(job=job, targets={"pressure": target}, vary=["diameter"], steps=3, lr=0.01,
                                      keep="phi", fd_every=None, seeds=range(0, 3)))
    assert result.converged and len(result.history) == 3
    last = result.final
    # The mean loss is the mean of the members' own losses, recomputed here from their pressures.
    pressures = last.members["pressure"]
    assert pressures.shape == (3,) and len(set(np.round(pressures, 12))) == 3  # three different packings
    assert last.loss == pytest.approx(float(np.mean(((pressures - target) / target) ** 2)), rel=1e-12)
    assert result.history[-1].loss < result.history[0].loss

    v = np.random.default_rng(3).normal(size=2)
    h = 1e-5
    losses = {+1.0: [], -1.0: []}
    for m in range(3):
        system = systems.get("bidisperse").build(n=16, seed=m)
        params = {k: jnp.asarray(np.asarray(a[m])) for k, a in last.params.items()}
        q = jnp.asarray(last.q[m])
        reference = Reference(system, q, params, observables.rattlers(system, q, params))
        per_particle = lambda d: np.asarray(d)[np.asarray(system.species)]  # noqa: E731
        for sign in (+1.0, -1.0):
            d = np.asarray(params["diameter"]) + sign * h * v
            box = np.asarray(params["box"]) * math.sqrt(np.sum(per_particle(d) ** 2)
                                                      / np.sum(per_particle(params["diameter"]) ** 2))
            p = {**params, "diameter": jnp.asarray(d), "box": jnp.asarray(box)}
            pressure = float(jax.jit(observables.pressure, static_argnums=0)(system, reference.relaxed_at(p), p))
            losses[sign].append(((pressure - target) / target) ** 2)
    expected = (np.mean(losses[+1.0]) - np.mean(losses[-1.0])) / (2 * h)
    predicted = float(np.sum(last.grad["diameter"] * v))
    # Pressure needs no inner solve: Newton to round-off, O(h²) ~1e-9 relative; 1e-6 as for one packing.
    assert_close(predicted, expected, rtol=1e-6)


def test_seeds_bad_input_exits_2_without_a_file(tmp_path):
    """A per-particle parameter drawn per seed cannot be shared; --seeds at fixed
    pressure is refused; an empty range is refused."""
    cases = [(["polydisperse", "--vary", "diameter", "--seeds", "0:2"], "differs between members"),
             (["bidisperse", "--vary", "diameter", "--seeds", "0:2", "--set", "pressure=0.01"], "--seeds at fixed"),
             (["bidisperse", "--vary", "diameter", "--seeds", "3:1"], "empty range")]
    for args, message in cases:
        out = tmp_path / "bad.h5"
        result = cli.invoke(app, ["design", *args, "--set", "n=16", "--target", "pressure=0.05", "-o", str(out)])
        assert result.exit_code == 2, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
        assert not out.exists()


# -- a relaxation that fails mid-design (exit 3) ----------------------------------------------

_FAILING = {
    "phi": (design._Runner, ["polydisperse", "--keep", "phi", "--target", "pressure=0.05", "--vary", "diameter"]),
    "pressure": (design._PressureRunner, ["bidisperse", "--set", "pressure=0.01", "--keep", "pressure",
                                          "--target", "packing_fraction=0.87", "--vary", "pressure"]),
    "seeds": (design._BatchRunner, ["bidisperse", "--seeds", "0:2", "--keep", "phi", "--target", "pressure=0.05",
                                    "--vary", "diameter"]),
}


@pytest.mark.slow  # three designs, the fixed-pressure one compiles the enthalpy relaxation (~30 s each on 2 cores)
@pytest.mark.parametrize("mode", list(_FAILING))
def test_relaxation_failing_mid_design_keeps_the_steps_flags_the_file_and_exits_3(tmp_path, monkeypatch, mode):
    """Every relaxation after the fourth fails (the start, the two re-relaxations of
    the step-0 gradient check and step 1 succeed): step 2 is retried at half the
    rate until the retries run out, the design stops, the two accepted steps are
    written, flagged (converged false, why it stopped), and the command exits 3."""
    runner, args = _FAILING[mode]
    relax = runner.relax
    calls = {"n": 0}

    def failing(self, theta, start):
        calls["n"] += 1
        return relax(self, theta, start) if calls["n"] <= 4 else None

    monkeypatch.setattr(runner, "relax", failing)
    out = tmp_path / "failed.h5"
    result = cli.invoke(app, ["design", *args, "--set", "n=16", "--steps", "20", "--lr", "0.002", "-o", str(out)])
    assert result.exit_code == 3, result.output
    assert "design stopped" in result.output and str(out) in result.output
    retries = design.Design().max_retries
    assert calls["n"] == 4 + retries + 1  # step 2: the first try and every retry, then nothing more
    record = io.read(out)
    trajectory = record["design"]
    attrs = trajectory["attrs"]
    assert attrs["keep"] == ("pressure" if mode == "pressure" else "phi")
    assert attrs["converged"] is False or attrs["converged"] == 0
    assert "no acceptable step 2" in attrs["stopped"]
    assert attrs["steps"] == 2 and attrs["steps_requested"] == 20
    assert attrs["rejections"] == retries + 1
    assert trajectory["loss"].shape == (2,) and np.all(np.isfinite(trajectory["loss"]))
    # The checks done before the failure are kept (step 0), none after it.
    assert list(trajectory["fd_check"]["step"]) == [0]
    # The packing written is a regular run file of the better of the two steps.
    best = int(np.argmin(trajectory["loss"]))
    assert attrs["best_step"] == best
    varied = "pressure" if mode == "pressure" else "diameter"
    assert_close(np.asarray(record["parameters"][varied]), np.asarray(trajectory[varied][best]), rtol=0)
    assert bool(record["observables"]["converged"])  # that packing itself relaxed
    if mode == "seeds":
        assert list(trajectory["members"]["seed"]) == [0, 1]
        assert trajectory["members"]["loss"].shape == (2, 2)
