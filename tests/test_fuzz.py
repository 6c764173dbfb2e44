"""Property-based tests (hypothesis) of the command line: `mdsens run`, `show`,
`export` and `check`, in-process through Typer's CliRunner, at small N.

Every example, whatever its arguments, must:

* end without a traceback (no uncaught exception, no "Traceback" in the output);
* exit 0, 1, 2 or 3;
* leave no output file behind on an error (exit not 0 and not 3);
* never clobber an existing output file unless ``--force`` was given and the
  verb succeeded (some examples pre-create the output with known bytes).

The default run draws a few dozen examples (fixed seed, no example database:
reproducible in CI); the ``slow`` tests draw thousands. Valid draws keep N in
{8, 16} (JAX compiles once per new shape) and ``--max-steps`` small.

Non-finite build values (``--set epsilon=inf``) are refused (exit 2) and an
overflowing one (``epsilon=1e300``) stops the relaxation as not converged;
both have fixed tests below and stay out of the random draws (slow).
"""

from __future__ import annotations

import contextlib
import time
import tempfile
from pathlib import Path

import h5py
import jax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mdsens.cli import app

runner = CliRunner()

EXIT_CODES = {0, 1, 2, 3}
SENTINEL = b"precious bytes, not an mdsens file\n"


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


DEFAULT = {"run_errors": 40, "run_valid": 4, "show": 30, "export": 30, "check": 30}
SLOW = {"run_errors": 2000, "run_valid": 200, "show": 2000, "export": 2000, "check": 300}


# -- the invariants ------------------------------------------------------------------------


@contextlib.contextmanager
def _jax_restored():
    """`--precision float32` and `--device` change JAX's global configuration in-process."""
    x64, platforms = jax.config.jax_enable_x64, jax.config.jax_platforms
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", x64)
        jax.config.update("jax_platforms", platforms)


def invoke_checked(args: list[str], output: Path | None = None, precreate: bool = False,
                   force: bool = False) -> int:
    """Run ``mdsens *args`` and assert the invariants; returns the exit code."""
    if output is not None and precreate:
        output.write_bytes(SENTINEL)
    with _jax_restored():
        result = runner.invoke(app, args)
    where = f"mdsens {' '.join(args)}\n{result.output}"
    exc = result.exception
    assert exc is None or isinstance(exc, SystemExit), f"uncaught {exc!r}: {where}"
    assert "Traceback" not in result.output, where
    assert result.exit_code in EXIT_CODES, where
    if output is not None:
        succeeded = result.exit_code in (0, 3)
        if precreate and not (force and succeeded):
            assert output.read_bytes() == SENTINEL, f"{output} clobbered: {where}"
        elif not succeeded:
            assert not output.exists(), f"{output} left behind on exit {result.exit_code}: {where}"
        # No temporary files next to it either.
        leftovers = [p.name for p in output.parent.iterdir() if p.name != output.name]
        assert not leftovers, f"left {leftovers}: {where}"
    return result.exit_code


# -- strategies ----------------------------------------------------------------------------

SYSTEMS = ["bidisperse", "polydisperse", "lj_crystal", "morse_cluster", "from_file"]
JUNK_TEXT = st.sampled_from(["", " ", "x", "nan", "-", "[", "]", "=", "1e999", "--", "ñ", "a b", "0x10",
                             "None", "1,2", ",", "\x00"])

junk_system = st.one_of(st.sampled_from(["nosuch", "", "BIDISPERSE", "bidisperse ", "-", "../x", "from-file"]),
                        st.text(max_size=8))

# bidisperse keys: valid values, and values that must be refused quickly.
VALID_SET = {
    "n": ["8", "16"],
    "phi": ["0.9", "0.95"],
    "diameter": ["1.0,1.4", "1,1.4"],
    "epsilon": ["1.0", "2"],
    "alpha": ["2", "2.5"],
    "dim": ["2"],
}
JUNK_SET = {
    "n": ["0", "1", "-3", "-16", str(10**12), str(2**63), str(-2**70), "three", "16.0", "1e3", ""],
    "dim": ["0", "1", "4", "-2", "two", "2.0", "3"],  # dim=3 at n <= 16: the box is too small
    "phi": ["0", "-1", "nan", "inf", "-inf", "1e300", "x", ""],
    "diameter": ["1.0", "1,2,3", "-1,1", "0,1", "nan,1", "inf,1", "1e300,1", "a,b", "", ","],
    "epsilon": ["0", "-1", "nan", "-inf", "e"],
    "alpha": ["1", "0.5", "-2", "nan", "a"],
}
valid_n = st.sampled_from(VALID_SET["n"])


@st.composite
def junk_set_item(draw) -> str:
    kind = draw(st.sampled_from(["value", "unknown", "malformed"]))
    if kind == "value":
        key = draw(st.sampled_from(sorted(JUNK_SET)))
        return f"{key}={draw(st.sampled_from(JUNK_SET[key]))}"
    if kind == "unknown":
        key = draw(st.one_of(st.sampled_from(["nn", "N", "cells", "spread", "path", " ", ""]),
                             st.text(alphabet="abcxyz_", min_size=1, max_size=5)))
        if key.strip() in VALID_SET:
            key = "zz" + key
        return f"{key}={draw(st.one_of(JUNK_TEXT, st.sampled_from(['1', '16'])))}"
    return draw(st.sampled_from(["n", "n16", "", "16", "==", "phi:0.9", "-n=16"]))


valid_wrt = st.sampled_from(["diameter", "diameter[0]", "diameter[1]", "epsilon", "alpha", "box", "box[1]"])
junk_wrt = st.sampled_from(["nope", "diameter[5]", "diameter[x]", "diameter[", "diameter[-9]", "[0]", "",
                            "diameter[0,0]", "box[2]", "sigma", "diameter[1.5]", "diameter[]"])
valid_observe = st.sampled_from(["energy", "pressure", "max_force"])
junk_observe = st.sampled_from(["entropy", "", "Energy", "energy ", "position"])
junk_ftol = st.one_of(st.sampled_from(["0", "-1", "nan", "-inf", "inf", "1e-300", "x", ""]),
                      st.floats(max_value=0.0).map(repr))
junk_max_steps = st.sampled_from(["-1", "-100", "x", "1.5", "", str(2**70)])
junk_choice = st.one_of(JUNK_TEXT, st.sampled_from(["FIRE", "bfgs", "cg ", "float16", "double", "jacobi2"]))


def _option_pairs(flag: str, values: list[str]) -> list[str]:
    return [a for v in values for a in (flag, v)]


@st.composite
def run_args(draw, junk: bool) -> tuple[list[str], bool, bool]:
    """(arguments after `run`, without -o; pre-create the output?; --force?).

    ``junk``: at least one argument is invalid (these examples exit 1 or 2 before
    compiling anything, mostly); otherwise every argument is valid and the run
    reaches the relaxation (a compile: a few seconds each)."""
    args: list[str] = []
    sets = {k: draw(st.sampled_from(v)) for k, v in VALID_SET.items()
            if k == "n" or draw(st.booleans())}
    wrt = draw(st.lists(valid_wrt, max_size=2))
    observe = draw(st.lists(valid_observe, max_size=2))
    grad = draw(st.lists(st.sampled_from(["energy", "pressure"]), max_size=1))
    opts: dict[str, str] = {}
    if draw(st.booleans()):
        opts["--minimizer"] = draw(st.sampled_from(["fire", "gd"]))
    opts["--max-steps"] = draw(st.sampled_from(["0", "1", "5", "20"]))
    if draw(st.booleans()):
        opts["--ftol"] = draw(st.sampled_from(["1e-10", "1e-3", "1e-6"]))
    if draw(st.booleans()):
        opts["--solver"] = draw(st.sampled_from(["cg", "dense"]))
    if draw(st.booleans()):
        opts["--preconditioner"] = draw(st.sampled_from(["twolevel", "jacobi", "none"]))
    if draw(st.booleans()):
        opts["--precision"] = "float64"
    if draw(st.booleans()):
        opts["--device"] = "cpu"
    system = "bidisperse"
    if junk:
        # One to three things wrong, the rest valid.
        for what in draw(st.lists(st.sampled_from(
                ["system", "set", "wrt", "observe", "grad", "ftol", "max_steps", "minimizer", "solver",
                 "precision", "preconditioner", "device", "rtol"]), min_size=1, max_size=3, unique=True)):
            if what == "system":
                system = draw(junk_system)
            elif what == "set":
                item = draw(junk_set_item())
                key = item.split("=", 1)[0].strip() if "=" in item else None
                if key in sets and draw(st.booleans()):
                    del sets[key]  # the junk value alone, else the later one wins
                args += ["--set", item]
            elif what == "wrt":
                wrt.append(draw(junk_wrt))
            elif what in ("observe", "grad"):
                (observe if what == "observe" else grad).append(draw(junk_observe))
            elif what == "ftol":
                opts["--ftol"] = draw(junk_ftol)
            elif what == "max_steps":
                opts["--max-steps"] = draw(junk_max_steps)
            elif what == "rtol":
                opts["--rtol"] = draw(st.sampled_from(["x", "", "nan"]))
            else:
                opts["--" + what.replace("_", "-")] = draw(junk_choice)
    args = [system, *_option_pairs("--set", [f"{k}={v}" for k, v in sets.items()]), *args,
            *_option_pairs("--wrt", wrt), *_option_pairs("--observe", observe), *_option_pairs("--grad", grad)]
    for flag, value in opts.items():
        args += [flag, value]
    if draw(st.booleans()):
        args.append(draw(st.sampled_from(["--json", "--quiet", "--all-pairs", "--neighbor-list"])))
    return args, draw(st.booleans()), draw(st.booleans())


def _fuzz_run(args: list[str], precreate: bool, force: bool) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "out.h5"
        full = ["run", *args, "-o", str(output), "--no-cache"] + (["--force"] if force else [])
        return invoke_checked(full, output, precreate, force)


@_settings(DEFAULT["run_errors"])
@given(run_args(junk=True))
def test_run_fuzz_bad_arguments(drawn):
    _fuzz_run(*drawn)


@_settings(DEFAULT["run_valid"])
@given(run_args(junk=False))
def test_run_fuzz_valid_arguments(drawn):
    code = _fuzz_run(*drawn)
    args, precreate, force = drawn
    if not precreate or force:
        # Everything was valid; dense-solver/wrt combinations may still be refused (2).
        assert code in (0, 2, 3)


@pytest.mark.slow
@_settings(SLOW["run_errors"])
@given(run_args(junk=True))
def test_run_fuzz_bad_arguments_slow(drawn):
    _fuzz_run(*drawn)


@pytest.mark.slow
@_settings(SLOW["run_valid"])
@given(run_args(junk=False))
def test_run_fuzz_valid_arguments_slow(drawn):
    _fuzz_run(*drawn)


def test_huge_n_is_refused_quickly(tmp_path):
    """n = 10¹² fails at once (numpy refuses 3.6 TiB) in one line, exit 1, no file.
    (A huge n is not a usage error yet: the families have no upper bound on n.)"""
    import time

    output = tmp_path / "huge.h5"
    start = time.perf_counter()
    code = invoke_checked(["run", "--set", f"n={10**12}", "-o", str(output), "-q", "--no-cache"], output)
    assert code in (1, 2) and time.perf_counter() - start < 10


@pytest.mark.parametrize("item", ["epsilon=inf", "alpha=inf", "diameter=1,nan"])
def test_non_finite_parameters_are_refused(tmp_path, item):
    output = tmp_path / "x.h5"
    code = invoke_checked(["run", "--set", "n=16", "--set", item, "--max-steps", "50", "-o", str(output),
                           "-q", "--no-cache"], output)
    assert code == 2


def test_overflowing_parameters_stop_quickly(tmp_path):
    # Finite but absurd: the relaxation diverges; it must stop (not converged, or a
    # one-line error) instead of looping on tables that cannot fit NaN positions.
    output = tmp_path / "x.h5"
    start = time.perf_counter()
    code = invoke_checked(["run", "--set", "n=16", "--set", "epsilon=1e300", "--max-steps", "50", "-o",
                           str(output), "-q", "--no-cache"], output)
    assert code in (1, 3) and time.perf_counter() - start < 120


# -- files for show / export / check ------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One small valid run (N = 16, one derivative element: check stays cheap),
    and its damaged variants."""
    root = tmp_path_factory.mktemp("fuzzfiles")
    valid = root / "valid.h5"
    result = runner.invoke(app, ["run", "--set", "n=16", "--set", "phi=0.95", "--seed", "1",
                                 "--wrt", "diameter[0]", "-o", str(valid), "-q", "--no-cache"])
    assert result.exit_code == 0, result.output
    data = valid.read_bytes()
    out = {"valid": valid, "missing": root / "missing.h5", "directory": root}
    for k in (0, 1, 8, 100, 512, 2048, len(data) // 2, len(data) - 1):
        (root / f"truncated{k}.h5").write_bytes(data[:k])
        out[f"truncated{k}"] = root / f"truncated{k}.h5"
    (root / "text.h5").write_text("this is not HDF5\n")
    (root / "noise.h5").write_bytes(bytes(range(256)) * 8)
    corrupt = bytearray(data)
    corrupt[len(data) // 3: len(data) // 3 + 64] = b"\xff" * 64
    (root / "corrupt.h5").write_bytes(bytes(corrupt))
    with h5py.File(root / "foreign.h5", "w") as f:
        f["x"] = [1, 2, 3]
    with h5py.File(root / "hollow.h5", "w") as f:  # claims to be mdsens, holds nothing else
        f.create_group("h5md/creator").attrs["name"] = "mdsens"
    for name in ("text", "noise", "corrupt", "foreign", "hollow"):
        out[name] = root / f"{name}.h5"
    return out


def _file(files, name: str) -> str:
    return str(files[name])


file_names = st.sampled_from(["valid", "valid", "missing", "directory", "truncated0", "truncated1", "truncated8",
                              "truncated100", "truncated512", "truncated2048", "text", "noise", "corrupt",
                              "foreign", "hollow"]
                             + [f"truncated{k}" for k in ("half", "last")])


def _resolve(files, name: str) -> str:
    if name in ("truncatedhalf", "truncatedlast"):
        keys = sorted((k for k in files if k.startswith("truncated")), key=lambda k: int(k[9:]))
        name = keys[-2] if name == "truncatedhalf" else keys[-1]
    return _file(files, name)


@st.composite
def show_args(draw, files) -> list[str]:
    args = ["show", _resolve(files, draw(file_names))]
    if draw(st.booleans()):
        args += ["--top", draw(st.sampled_from(["0", "1", "5", "-1", "-100", "100000", "x", ""]))]
    if draw(st.booleans()):
        args.append("--json")
    if draw(st.integers(0, 9)) == 0:
        args.append(draw(st.sampled_from(["--nope", "extra-arg", "--force"])))
    return args


def _fuzz_show(files, data):
    invoke_checked(data.draw(show_args(files)))


@_settings(DEFAULT["show"])
@given(data=st.data())
def test_show_fuzz(files, data):
    _fuzz_show(files, data)


@pytest.mark.slow
@_settings(SLOW["show"])
@given(data=st.data())
def test_show_fuzz_slow(files, data):
    _fuzz_show(files, data)


def _fuzz_export(files, data):
    source = _resolve(files, data.draw(file_names))
    fmt = data.draw(st.one_of(st.sampled_from(["extxyz", "h5md3d", "gsd"]), junk_choice,
                              st.sampled_from(["xyz", "EXTXYZ", "h5md", "pdb"])))
    precreate, force = data.draw(st.booleans()), data.draw(st.booleans())
    suffix = data.draw(st.sampled_from([".xyz", ".h5", ".gsd", "", ".out"]))
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / f"exported{suffix}"
        args = ["export", source, "--format", fmt, "-o", str(output)]
        if force:
            args.append("--force")
        if data.draw(st.booleans()):
            args.append("-q")
        code = invoke_checked(args, output, precreate, force)
        if code == 0:
            assert output.exists() and output.stat().st_size > 0
    assert code != 3


@_settings(DEFAULT["export"])
@given(data=st.data())
def test_export_fuzz(files, data):
    _fuzz_export(files, data)


@pytest.mark.slow
@_settings(SLOW["export"])
@given(data=st.data())
def test_export_fuzz_slow(files, data):
    _fuzz_export(files, data)


def test_export_into_a_missing_directory_is_one_line(files, tmp_path):
    output = tmp_path / "no" / "such" / "dir.xyz"
    code = invoke_checked(["export", str(files["valid"]), "--format", "extxyz", "-o", str(output)])
    assert code in (1, 2) and not output.exists()


def _fuzz_check(files, data, full: bool):
    """``full``: the valid file may be checked for real (finite differences: two
    re-relaxations and a compile, ~10 s); otherwise every file is drawn with a ``--wrt``
    that names no stored element, refused after reading, before any finite difference."""
    name = data.draw(file_names)
    args = ["check", _resolve(files, name)]
    if not full:  # the corrupt file may still read (garbage in a dataset): no finite differences either
        args += ["--wrt", data.draw(junk_wrt)]
    elif data.draw(st.booleans()):
        args += ["--wrt", data.draw(st.one_of(st.sampled_from(["diameter", "diameter[0]"]), junk_wrt))]
    if data.draw(st.integers(0, 3)) == 0:
        args += ["--h", data.draw(st.sampled_from(["1e-5", "1e-4", "0", "-1e-5", "x"]))]
    if data.draw(st.integers(0, 3)) == 0:
        args += ["--tol", data.draw(st.sampled_from(["1e-4", "0", "-1", "nan", "inf", "x"]))]
    if data.draw(st.booleans()):
        args.append(data.draw(st.sampled_from(["--json", "-q"])))
    code = invoke_checked(args)
    assert code != 3
    if name == "valid" and not full:
        assert code == 2


@_settings(DEFAULT["check"])
@given(data=st.data())
def test_check_fuzz(files, data):
    _fuzz_check(files, data, full=False)


@pytest.mark.slow
@_settings(SLOW["check"])
@given(data=st.data())
def test_check_fuzz_slow(files, data):
    _fuzz_check(files, data, full=True)


def test_the_valid_file_checks_out(files):
    """The fixture's file is what the fuzzers damage: it must itself pass every verb."""
    assert invoke_checked(["show", str(files["valid"]), "--json"]) == 0
    assert invoke_checked(["check", str(files["valid"]), "-q"]) == 0


@pytest.mark.parametrize("tol", ["0", "-1", "nan", "inf"])
def test_check_refuses_a_tolerance_that_is_not_positive(files, tol):
    """Found by the slow fuzzer's warning: `check --tol 0` divided by zero for the
    differences' resolution, which made every derivative agree (exit 0)."""
    result = runner.invoke(app, ["check", str(files["valid"]), "--tol", tol])
    assert result.exit_code == 2 and "--tol" in result.stderr and "positive" in result.stderr, result.output


@pytest.mark.parametrize("wrt", ["diameter[1]", "diameter[x]", "diameter[", "diameter[0,0]", "diameter[]"])
def test_check_wrt_naming_no_stored_element_is_refused(files, wrt):
    """Found by the fuzzer: `check --wrt diameter[1]` on a file that stores only
    diameter[0] compared nothing and said "agree" (exit 0)."""
    result = runner.invoke(app, ["check", str(files["valid"]), "--wrt", wrt])
    assert result.exit_code == 2 and "no stored derivative element matches" in result.stderr, result.output
