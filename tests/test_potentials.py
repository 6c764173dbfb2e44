"""potentials.power and our smooth-cutoff Lennard-Jones against independent references;
usage errors of the new relaxation options."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

from mdsens import potentials
from mdsens.cli.app import app

jax.config.update("jax_enable_x64", True)


@pytest.mark.parametrize("a", [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 1.7])
def test_power_and_its_derivatives_equal_the_plain_power(a):
    b, a = jnp.asarray(0.37), jnp.asarray(a)
    plain = lambda b_, a_: b_ ** a_  # noqa: E731
    assert float(potentials.power(b, a)) == pytest.approx(float(plain(b, a)), rel=1e-15)
    for argnums in ((0, 1),):
        got = jax.hessian(potentials.power, argnums)(b, a)
        want = jax.hessian(plain, argnums)(b, a)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-13, atol=1e-15)
    # central differences of the first derivative in the exponent
    h = 1e-6
    fd = (potentials.power(b, a + h) - potentials.power(b, a - h)) / (2 * h)
    assert float(jax.grad(potentials.power, 1)(b, a)) == pytest.approx(float(fd), rel=1e-7, abs=1e-9)


def test_lennard_jones_matches_jax_md_smooth_cutoff():
    from jax_md import energy

    r = jnp.linspace(0.85, 2.7, 101)
    # strongly typed float64: jax-md multiplies by float32 constants, which would
    # round weakly typed parameters (docs/design.md, pitfalls)
    args = [jnp.asarray(v, dtype=jnp.float64) for v in (1.1, 0.7, 2.2, 2.6)]
    ref = energy.multiplicative_isotropic_cutoff(lambda d, **kw: energy.lennard_jones(d, args[0], args[1]),
                                                  args[2], args[3])(r)
    np.testing.assert_allclose(np.asarray(potentials.lennard_jones(r, *args)), np.asarray(ref), rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("extra, message", [
    (["--polish", "1e-12"], "--polish"),
    (["--resume", "no-such.npz"], "no such file"),
    (["--checkpoint", "ck.npz", "--checkpoint-every", "-1"], "--checkpoint-every"),
    (["--polish", "1e-6", "--checkpoint", "ck.npz"], "cannot be combined"),
])
def test_relaxation_options_refuse_bad_input_in_one_line(tmp_path, extra, message):
    out = tmp_path / "x.h5"
    result = CliRunner().invoke(app, ["run", "--set", "n=16", "-q", "--no-cache", "-o", str(out), *extra])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not out.exists()
