"""``mdsens bench``: implicit derivatives against unrolled autodiff and finite differences.

For each N, side by side in one run, on one relaxed state x* (shared through a
scratch file, so every method differentiates the same minimum):

- ``relax``: FIRE to ``ftol`` (neighbor lists from ``neighbors.AUTO_THRESHOLD``);
- ``implicit``: forward mode for one parameter (``diameter[0]``) and reverse
  mode for the gradient of the pressure w.r.t. every parameter (all N
  diameters), preconditioned CG (``solver="cg"``) or the sparse direct solve
  (``solver="sparse"``, :mod:`mdsens.sparse`: each timed call factors anew,
  its cache cleared; ``*_warm_s`` is the same call reusing the factorization,
  ``shared_s`` the forward and the reverse derivative in one program on one
  factorization, what a run with ``--wrt`` and ``--grad`` pays; "auto" picks as ``mdsens run`` does);
- ``unrolled``: ``jax.grad`` of P through the same FIRE, unrolled for S steps
  from x₀ (all pairs; skipped with a note when a linear fit of memory vs S,
  measured on short runs, predicts more than the memory budget);
- ``fd``: central differences ``(P(D_i + h) − P(D_i − h)) / 2h``, each side
  re-relaxed from x* to ``fd_ftol``, for a sample of the diameters; the full
  gradient time is extrapolated (number of diameters × time per parameter);
- ``reference``: the reverse-mode gradient with unpreconditioned CG at
  ``rtol = 1e-13`` (a different solve path and tolerance; for N ≤ 256 also a
  dense pseudo-inverse), against which every method's error is measured;
- ``peer`` (``peer="lammps"``, :mod:`mdsens.peers`): the same relaxation in
  LAMMPS (FIRE to the same ``ftol`` on ``max_i |F_i|``, from the same initial
  positions, one thread): steps, seconds, E/N and P at its own minimum, and a
  cross-check at mdsens's x* (LAMMPS's E, P and max|F| there vs mdsens's).

Each method runs in its own subprocess and reports its own peak RSS
(``getrusage``), so one method's memory never hides another's; a ``baseline``
subprocess (imports, system, x* loaded) gives the floor. Times exclude
compilation (reported separately) and are medians over ``repeats``.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

DEFAULT_UNROLL_STEPS = (50, 100, 200, 400)
#: what unrolled autodiff through FIRE keeps per step and pair (all N(N−1)/2 pairs), in
#: bytes: 112–121 MB a step at N = 1024 (2D bidisperse and polydisperse, session 16), so
#: ~220–230 bytes a pair; a curve point is skipped, not run, where this predicts more than
#: the memory budget (the first point at N = 1024, 50 steps: 5.8 GB against a 4 GB budget)
UNROLLED_BYTES_PER_PAIR_STEP = 240


def unrolled_prior_mb(n: int, steps: int, baseline_mb: float = 0.0) -> float:
    """The peak RSS (MB) expected of ``steps`` unrolled FIRE steps on all pairs of ``n``
    particles, before any is measured: the baseline plus
    :data:`UNROLLED_BYTES_PER_PAIR_STEP` per pair and step."""
    return baseline_mb + steps * UNROLLED_BYTES_PER_PAIR_STEP * n * (n - 1) / 2 / 2**20


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -- child side -------------------------------------------------------------------


def _setup(spec: dict[str, Any]):
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from mdsens import cache

    cache.enable(True)  # off under MDSENS_NO_CACHE, which `mdsens bench --no-cache` sets

    from mdsens import systems

    overrides = {"n": str(spec["n"]), **{k: str(v) for k, v in spec.get("set", {}).items()}}
    family = systems.get(spec["system"])
    system = family.build_fn(seed=spec["seed"], **family.resolve(overrides))
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    return system, params


def _relax_fn(spec, system, ftol, ahead=False):
    """relax(x0, params) -> (x, info, compile_s, pairs): the same relaxation and
    derivative pairs as ``mdsens run`` (:func:`mdsens.job.relax_system`), started
    from the real-space positions ``x0`` (x* for the finite differences).
    ``ahead``: as a run with the sparse solve, the factorization's ordering and
    analysis done beside the relaxation (:class:`mdsens.sparse.Ahead`; its thread
    joined inside the relaxation's time, and what it prepared then dropped)."""
    from mdsens import job as _job
    from mdsens import sparse

    settings = _job.Job(ftol=ftol, max_steps=spec["max_steps"], neighbor_list=spec.get("neighbor_list"),
                        polish=spec.get("polish"), max_displacement=spec.get("max_displacement"))

    def relax(x0, params):
        beside = sparse.Ahead(system, params) if ahead else None
        q, info, compile_s, pairs, _ = _job.relax_system(settings, system, params, x0=x0,
                                                         snapshot=None if beside is None else beside.offer)
        if beside is not None:
            beside.wait()
            sparse.clear_prepared()
        return system.to_real(q, params), info, compile_s, pairs
    return relax


def _load_state(spec):
    import jax.numpy as jnp

    data = np.load(spec["state"])
    pairs = jnp.asarray(data["pairs"]) if data["pairs"].size else None
    return jnp.asarray(data["q"]), jnp.asarray(data["rattler"]), pairs


def _timed(fn, args, repeats, before=None, compile_s=None):
    """(output, compile_s, median run seconds) of ``fn(*args)``; ``fn`` is
    compiled here unless ``compile_s`` says it already was."""
    import jax

    if compile_s is None:
        start = time.perf_counter()
        fn = jax.jit(fn).lower(*args).compile()
        compile_s = time.perf_counter() - start
    compiled = fn
    times, out = [], None
    for _ in range(repeats):
        if before is not None:
            before()
        t = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return out, compile_s, statistics.median(times)


def _gradient_fn(system, pairs, solve_of, options, *args):
    from mdsens import job, observables, sensitivity

    def make(s_):
        def fn(q_, p_, r_):
            return sensitivity.gradient_fn(s_, observables.pressure, r_, solve_of(s_, q_, p_, r_))(q_, p_)
        return fn
    return job.compiled(system, pairs, ("bench gradient", options), make, *args)


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from mdsens import job as _job
    from mdsens import observables, sensitivity

    system, params = _setup(spec)
    task = spec["task"]
    out: dict[str, Any] = {"task": task}
    if task == "relax":
        from mdsens import sparse

        solver = sensitivity.resolve_solver(spec.get("solver", "auto"), system)
        # as a run that goes on to its derivatives does (not with --relax-only: no derivative follows)
        ahead = (solver == "sparse" and sparse.ahead_pays(system) and not spec.get("relax_only")
                 and _job.use_neighbor_list(_job.Job(neighbor_list=spec.get("neighbor_list")), system))
        relax = _relax_fn(spec, system, spec["ftol"], ahead=ahead)
        # The first run compiles (timed apart) and pays one-off dispatch costs;
        # the reported time is the median of the runs after it.
        times = []
        for _ in range(1 + max(int(spec.get("repeats", 1)) - 1, 1)):
            t0 = time.perf_counter()
            x, info, compile_s, pairs = relax(jnp.asarray(system.positions), params)
            times.append(time.perf_counter() - t0 - compile_s)
            first_compile_s = compile_s if len(times) == 1 else first_compile_s
        out.update(relax_s=statistics.median(times[1:]), relax_first_s=times[0], relax_compile_s=first_compile_s,
                   steps=int(info.steps),
                   max_force=float(info.max_force), converged=bool(info.converged),
                   neighbor_list=_job.use_neighbor_list(_job.Job(neighbor_list=spec.get("neighbor_list")), system),
                   n_params=int(np.size(params["diameter"])))
        q = system.to_solver(x, params)
        rattler, _, _ = _job.run_compiled(system, pairs, "rattlers",
                                          lambda s_: lambda q_, p_: observables.rattlers(s_, q_, p_), q, params)
        np.savez(spec["state"], q=np.asarray(q), rattler=np.asarray(rattler),
                 pairs=np.asarray(pairs) if pairs is not None else np.zeros(0, np.int32))
        out["rattlers"] = int(np.sum(np.asarray(rattler)))
    elif task == "baseline":
        q, rattler, pairs = _load_state(spec)
        out["ok"] = bool(q.shape[0] == system.n)
    elif task in ("implicit", "reference"):
        q, rattler, pairs = _load_state(spec)
        solver = sensitivity.resolve_solver(spec.get("solver", "auto"), system) if task == "implicit" else "cg"
        job = _job.Job(rtol=spec["rtol"] if task == "implicit" else 1e-13, solver=solver,
                       preconditioner=spec["preconditioner"] if task == "implicit" else "none")
        if task == "reference" and system.n <= 256:
            job.solver = "dense"
        cold = None
        if solver == "sparse":
            from mdsens import sparse

            cold = sparse.clear_cache  # every timed call pays its factorization

        def solve_of(s_, q_, p_, r_):
            return _job._solver(job, s_, q_, p_, r_)

        options = (job.solver, job.rtol, job.preconditioner)
        args = (q, params, jnp.asarray(rattler))
        reverse_fn, c = _gradient_fn(system, pairs, solve_of, options, *args)
        (grad, info), _, r = _timed(reverse_fn, args, spec["repeats"] if task == "implicit" else 1, cold, c)
        out.update(solver=job.solver, reverse_s=r, reverse_compile_s=c, reverse_iterations=int(info.iterations),
                   reverse_residual=float(info.residual))
        if cold is not None:
            out["reverse_warm_s"] = _timed(reverse_fn, args, spec["repeats"], None, c)[2]
        np.save(spec["result"], np.asarray(grad["diameter"]))
        if task == "implicit":
            def make(s_):
                def f(q_, p_, r_):
                    fw = sensitivity.forward_fn(s_, "diameter", {"pressure": observables.pressure}, r_,
                                                solve_of(s_, q_, p_, r_), (0,))
                    return fw(q_, p_)
                return f
            forward, c = _job.compiled(system, pairs, ("bench forward", options), make, *args)
            fw, _, r = _timed(forward, args, spec["repeats"], cold, c)
            out.update(forward_s=r, forward_compile_s=c, forward_iterations=int(fw.iterations),
                       forward_dP_dD0=float(fw.values["pressure"]), forward_residual=float(fw.residual))
            if cold is not None:
                out["forward_warm_s"] = _timed(forward, args, spec["repeats"], None, c)[2]

                def make_both(s_):  # what `mdsens run --wrt --grad` pays: one program, one factorization
                    def f(q_, p_, r_):
                        return sensitivity.derivatives_fn(s_, {"pressure": observables.pressure},
                                                          [("diameter[0]", "diameter", (0,))], ["pressure"], r_,
                                                          solve_of(s_, q_, p_, r_))(q_, p_)
                    return f
                both, c = _job.compiled(system, pairs, ("bench derivatives", options), make_both, *args)
                out["shared_s"] = _timed(both, args, spec["repeats"], cold, c)[2]
                if pairs is not None and sparse.ahead_pays(system):
                    # as in a run, whose relaxation orders and analyses the factorization beside
                    # it (the relax task's time includes that thread): prepared here untimed
                    beside = sparse.Ahead(system, params)
                    x_star = system.to_real_on_host(q, params)

                    def prepared():
                        sparse.clear_cache()
                        sparse.clear_prepared()
                        beside.analyse(x_star)

                    used = sparse.STATS["ahead"]
                    out["shared_ahead_s"] = _timed(both, args, spec["repeats"], prepared, c)[2]
                    out["ahead_used"] = sparse.STATS["ahead"] - used == spec["repeats"]
                    sparse.clear_prepared()
    elif task == "fd":
        q, rattler, pairs = _load_state(spec)
        relax = _relax_fn(spec, system, spec["fd_ftol"])
        x_star = system.to_real(q, params)
        h = spec["h"]

        def contacts(s_, q_, p_):  # the contact network, as a set of pairs (tables differ between states)
            c, i_, j_ = (np.asarray(a) for a in s_.contact_list(q_, p_))
            return set(zip(i_[c].tolist(), j_[c].tolist()))

        at_star = contacts(system if pairs is None else system.with_pairs(pairs), q, params)
        values, per_param, steps, changed = [], [], [], []
        for i in spec["sample"]:
            elapsed = 0.0
            sides = []
            moved = False
            for sign in (1.0, -1.0):
                p = dict(params)
                p["diameter"] = params["diameter"].at[i].add(sign * h)
                t = time.perf_counter()
                x, info, c, pr = relax(x_star, p)
                steps.append(int(info.steps))
                qs = system.to_solver(x, p)
                s_ = system if pr is None else system.with_pairs(pr)
                sides.append(float(observables.pressure(s_, qs, p)))
                elapsed += time.perf_counter() - t - c  # compilation excluded, as for the others
                moved = moved or contacts(s_, qs, p) != at_star
            per_param.append(elapsed)
            values.append((sides[0] - sides[1]) / (2 * h))
            changed.append(moved)
        # where a contact opens or closes within ± h the differences straddle a kink of
        # x*(θ): their error then says nothing about the derivative (mdsens check: "not checked")
        out.update(fd_per_param_s=statistics.median(per_param), fd_sample=list(spec["sample"]), fd_values=values,
                   fd_relax_steps=statistics.median(steps), fd_contacts_changed=changed)
    elif task == "peer":
        out.update(_peer(spec, system, params))
    elif task == "unrolled":
        from mdsens.sensitivity import minimizer_for

        steps = int(spec["steps"])
        mini = minimizer_for(system)
        x0 = jnp.asarray(system.positions)

        def loss(p):
            state = mini.init(x0, p)
            state, _ = jax.lax.scan(lambda s, _: (mini.step(s, p), None), state, None, length=steps)
            return observables.pressure(system, system.to_solver(state.x, p), p)

        g, c, r = _timed(jax.grad(loss), (params,), 1)
        out.update(unrolled_s=r, unrolled_compile_s=c, steps=steps)
        if spec.get("result"):
            np.save(spec["result"], np.asarray(g["diameter"]))
    out["rss_mb"] = _rss_mb()
    return out


def _peer(spec, system, params) -> dict[str, Any]:
    """LAMMPS from the same initial positions to the same ftol (median seconds over
    ``repeats``), then E, P, max|F| at its minimum and at mdsens's x*."""
    import jax

    from mdsens import job as _job
    from mdsens import observables, peers

    if spec["peer"] != "lammps":
        raise ValueError(f"unknown peer {spec['peer']!r}")
    x0 = np.asarray(system.positions)

    def relaxations(lmp):  # ``repeats`` relaxations from the same start
        runs = []
        for _ in range(max(1, int(spec["repeats"]))):
            lmp.set_positions(x0)
            runs.append(lmp.minimize(spec["ftol"], spec["max_steps"]))
        return runs

    if spec.get("timing_only"):  # a later round of :func:`_alternate`: the relaxation alone
        with peers.Lammps(system, params, x0) as lmp:
            runs = relaxations(lmp)
        return {"peer": "lammps", "relax_s": statistics.median(r["seconds"] for r in runs),
                "steps": runs[-1]["steps"]}
    q, rattler, pairs = _load_state(spec)
    x_star = np.asarray(system.to_real(q, params))

    def at_x_star(obs):
        return float(_job.run_compiled(system, pairs, obs, lambda s_: lambda q_, p_: obs(s_, q_, p_), q, params)[0])

    mdsens = {"energy": at_x_star(observables.energy), "pressure": at_x_star(observables.pressure),
              "max_force": at_x_star(observables.max_force)}
    with peers.Lammps(system, params, x0) as lmp:
        runs = relaxations(lmp)
        own = lmp.evaluate()
        lmp.set_positions(x_star)
        cross = lmp.evaluate()
        version, setup_s = lmp.lmp.version(), lmp.setup_s
    seconds = statistics.median(r["seconds"] for r in runs)
    steps = runs[-1]["steps"]
    n = system.n

    def rel(a, b):
        return abs(a - b) / max(abs(b), 1e-300)

    return {
        "peer": "lammps", "lammps_version": version, "setup_s": setup_s,
        "relax_s": seconds, "relax_s_all": [r["seconds"] for r in runs], "steps": steps,
        "steps_all": [r["steps"] for r in runs], "s_per_step": seconds / max(steps, 1),
        "converged": own["max_force"] < spec["ftol"], "max_force": own["max_force"],
        "energy_per_particle": own["energy"] / n, "pressure": own["pressure"],
        "mdsens_energy_per_particle": mdsens["energy"] / n, "mdsens_pressure": mdsens["pressure"],
        "mdsens_max_force": mdsens["max_force"],
        "at_x_star": {"energy_per_particle": cross["energy"] / n, "pressure": cross["pressure"],
                      "max_force": cross["max_force"],
                      "energy_rel_diff": rel(cross["energy"], mdsens["energy"]),
                      "pressure_rel_diff": rel(cross["pressure"], mdsens["pressure"])},
    }


# -- parent side -----------------------------------------------------------------


def _spawn(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "mdsens.bench", json.dumps(spec)]
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if spec["task"] == "peer":
        env["OMP_NUM_THREADS"] = "1"  # the peer runs on one thread
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"task": spec["task"], "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        return {"task": spec["task"], "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def _alternate(row: dict[str, Any], base: dict[str, Any], peer: str, rounds: int, timeout: float, log) -> None:
    """The ratio to the peer over ``rounds`` alternating timings: round 1 is the
    relaxation's and the peer's first subprocesses, each later round one more of
    each (mdsens: a warm-up run, then the timed one; the peer: one run), one
    after the other. The machine's speed drifts by ±30 % within minutes, so a
    ratio of times taken minutes apart says less than one of times taken seconds
    apart: ``relax_over_peer`` is the median of the rounds' ratios, and each
    side's ``relax_s`` the median of its rounds (the first subprocess's own
    figures stay in ``relax_s_first``)."""
    relax, other = row["relax"], row["peer"]
    mine, theirs = [relax["relax_s"]], [other["relax_s"]]
    for k in range(1, max(1, int(rounds))):
        log(f"N={row['n']}: round {k + 1} of {rounds}, mdsens then {peer}")
        again = _spawn({**base, "task": "relax", "repeats": 1, "state": f"{base['state']}.round{k}.npz"}, timeout)
        peer_again = _spawn({**base, "task": "peer", "peer": peer, "repeats": 1, "timing_only": True}, timeout)
        if "error" in again or "error" in peer_again:
            row["notes"].append(f"round {k + 1} failed: {again.get('error') or peer_again.get('error')}")
            break
        mine.append(again["relax_s"])
        theirs.append(peer_again["relax_s"])
    ratios = [a / b for a, b in zip(mine, theirs)]
    relax["relax_s_first"], other["relax_s_first"] = relax["relax_s"], other["relax_s"]
    relax["relax_s_rounds"], other["relax_s_rounds"] = mine, theirs
    relax["relax_s"], other["relax_s"] = statistics.median(mine), statistics.median(theirs)
    other["s_per_step"] = other["relax_s"] / max(other.get("steps") or 1, 1)
    row["relax_over_peer_rounds"] = ratios
    row["relax_over_peer"] = statistics.median(ratios)


def _err(a, ref) -> float:
    a, ref = np.asarray(a, float), np.asarray(ref, float)
    return float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), 1e-300))


def run(
    system: str = "polydisperse",
    ns: tuple[int, ...] = (128, 1024),
    seed: int = 0,
    overrides: dict[str, str] | None = None,
    ftol: float = 1e-10,
    rtol: float = 1e-10,
    preconditioner: str = "twolevel",
    fd_sample: int = 3,
    fd_ftol: float = 1e-12,
    h: float = 1e-5,
    unroll_steps: tuple[int, ...] = DEFAULT_UNROLL_STEPS,
    memory_budget_mb: float = 4000.0,
    repeats: int = 3,
    max_steps: int = 100_000,
    timeout: float = 3600.0,
    log=None,
    peer: str | None = None,
    relax_only: bool = False,
    polish: float | None = None,
    solver: str = "auto",
    max_displacement: float | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-able report (``rows``: one per N).
    ``solver`` is the implicit derivatives' linear solve: "cg" (with
    ``preconditioner``), "sparse" (:mod:`mdsens.sparse`) or "auto" (what
    ``mdsens run`` uses, :func:`mdsens.sensitivity.resolve_solver`; each row's
    ``solver`` says which).
    ``peer="lammps"`` adds the LAMMPS relaxation (``row["peer"]``);
    ``relax_only`` skips the derivative methods (relaxation and peer only);
    ``polish`` hands mdsens's relaxation over to Newton steps at that max|F|;
    ``max_displacement`` caps FIRE's steps (:func:`mdsens.minimize.fire`)."""
    log = log or (lambda m: None)
    report: dict[str, Any] = {"system": system, "seed": seed, "overrides": dict(overrides or {}),
                              "ftol": ftol, "rtol": rtol, "preconditioner": preconditioner, "h": h,
                              "fd_ftol": fd_ftol, "memory_budget_mb": memory_budget_mb, "repeats": repeats,
                              "peer": peer, "relax_only": relax_only, "polish": polish, "solver": solver,
                              "max_displacement": max_displacement, "rows": []}
    with tempfile.TemporaryDirectory(prefix="mdsens-bench-") as tmp:
        for n in ns:
            base = {"system": system, "n": n, "seed": seed, "set": dict(overrides or {}), "ftol": ftol,
                    "max_steps": max_steps, "state": os.path.join(tmp, f"state{n}.npz"), "rtol": rtol,
                    "preconditioner": preconditioner, "repeats": repeats, "polish": polish, "solver": solver,
                    "max_displacement": max_displacement, "relax_only": relax_only}
            row: dict[str, Any] = {"n": n, "notes": []}
            log(f"N={n}: relax")
            relax = _spawn({**base, "task": "relax"}, timeout)
            row["relax"] = relax
            if "error" in relax or not relax.get("converged"):
                row["notes"].append(f"relaxation failed: {relax.get('error', 'not converged')}")
                report["rows"].append(row)
                continue
            row["baseline"] = _spawn({**base, "task": "baseline"}, timeout)
            if peer:
                log(f"N={n}: peer {peer}")
                row["peer"] = _spawn({**base, "task": "peer", "peer": peer}, timeout)
                if "error" not in row["peer"]:
                    _alternate(row, base, peer, repeats, timeout, log)
            if relax_only:
                report["rows"].append(row)
                continue
            log(f"N={n}: implicit")
            row["implicit"] = _spawn({**base, "task": "implicit", "result": os.path.join(tmp, f"imp{n}.npy")}, timeout)
            log(f"N={n}: reference")
            row["reference"] = _spawn({**base, "task": "reference", "result": os.path.join(tmp, f"ref{n}.npy")},
                                      timeout)
            ref = np.load(os.path.join(tmp, f"ref{n}.npy")) if "error" not in row["reference"] else None
            if ref is not None and "error" not in row["implicit"]:
                row["implicit"]["reverse_error"] = _err(np.load(os.path.join(tmp, f"imp{n}.npy")), ref)
            # finite differences on a sample of the diameters (N per-particle ones, or one per species)
            n_params = int(relax.get("n_params", n))
            rng = np.random.default_rng(seed)
            sample = sorted(int(i) for i in rng.choice(n_params, size=min(fd_sample, n_params), replace=False))
            if not sample:  # --fd-sample 0: no finite differences
                row["fd"] = {"skipped": "--fd-sample 0"}
                row["notes"].append("finite differences skipped (--fd-sample 0)")
                fd = row["fd"]
            else:
                log(f"N={n}: finite differences ({len(sample)} parameters)")
                fd = _spawn({**base, "task": "fd", "sample": sample, "h": h, "fd_ftol": fd_ftol}, timeout)
            if "error" not in fd and "skipped" not in fd:
                fd["fd_full_gradient_s_extrapolated"] = fd["fd_per_param_s"] * n_params
                if ref is not None:
                    fd["fd_error"] = _err(fd["fd_values"], ref[sample])
                    row["implicit"]["reverse_error_on_fd_sample"] = _err(np.load(os.path.join(tmp, f"imp{n}.npy"))[sample],
                                                                       ref[sample])
            row["fd"] = fd
            # unrolled: memory vs steps on short runs, then the full run if it fits the budget
            steps_full = int(relax["steps"])
            if n >= 2048:
                row["unrolled"] = {"skipped": "unrolled autodiff runs on all pairs (O(N²) per step); skipped "
                                              "from N = 2048"}
            else:
                curve = []
                floor = float(row.get("baseline", {}).get("rss_mb") or 0.0)
                for s in sorted(set(min(s, steps_full) for s in unroll_steps)):
                    done = [c for c in curve if c.get("rss_mb")]
                    # Unrolled memory grows linearly with steps: stop the curve before a
                    # point that would exceed the budget (or the machine), predicted from
                    # the last point measured, or for the first one from N² pairs.
                    expect = (done[-1]["rss_mb"] * s / done[-1]["steps"] if done
                              else unrolled_prior_mb(n, s, floor))
                    if expect > memory_budget_mb:
                        curve.append({"steps": s, "skipped": f"predicted {expect:.0f} MB > {memory_budget_mb:.0f} MB"})
                        break
                    log(f"N={n}: unrolled, {s} steps")
                    r = _spawn({**base, "task": "unrolled", "steps": s}, timeout)
                    curve.append({"steps": s, **{k: r.get(k) for k in ("unrolled_s", "rss_mb", "error")}})
                row["unrolled_curve"] = curve
                ok = [c for c in curve if c.get("rss_mb")]
                if len(ok) >= 2:
                    slope = (ok[-1]["rss_mb"] - ok[0]["rss_mb"]) / max(ok[-1]["steps"] - ok[0]["steps"], 1)
                    predicted = ok[-1]["rss_mb"] + slope * (steps_full - ok[-1]["steps"])
                elif ok:  # one point: memory ∝ steps (the tape holds every step)
                    slope = ok[0]["rss_mb"] / ok[0]["steps"]
                    predicted = slope * steps_full
                else:  # nothing measured (the first point alone would not fit): the prior
                    slope, predicted = None, unrolled_prior_mb(n, steps_full, floor)
                full: dict[str, Any] = {"steps": steps_full, "mb_per_step": slope, "predicted_rss_mb": predicted}
                if predicted > memory_budget_mb:
                    full["skipped"] = (f"predicted peak {predicted:.0f} MB for {steps_full} steps exceeds the "
                                       f"budget {memory_budget_mb:.0f} MB")
                else:
                    log(f"N={n}: unrolled, full {steps_full} steps")
                    r = _spawn({**base, "task": "unrolled", "steps": steps_full,
                                "result": os.path.join(tmp, f"unr{n}.npy")}, timeout)
                    full.update(r)
                    if "error" not in r and ref is not None:
                        full["unrolled_error"] = _err(np.load(os.path.join(tmp, f"unr{n}.npy")), ref)
                row["unrolled"] = full
            imp = row["implicit"]
            if "error" not in imp:
                row["derivative_over_relax"] = (imp["forward_s"] + imp["reverse_s"]) / relax["relax_s"]
                if "shared_s" in imp:  # the sparse solve: one factorization serves both, as in a run
                    row["derivative_shared_over_relax"] = imp["shared_s"] / relax["relax_s"]
                if "shared_ahead_s" in imp:
                    row["derivative_ahead_over_relax"] = imp["shared_ahead_s"] / relax["relax_s"]
                if "fd_full_gradient_s_extrapolated" in fd:
                    row["fd_over_reverse"] = fd["fd_full_gradient_s_extrapolated"] / imp["reverse_s"]
                un = row["unrolled"]
                if "unrolled_s" in un:
                    row["unrolled_over_reverse"] = un["unrolled_s"] / imp["reverse_s"]
            report["rows"].append(row)
    return report


def table(report: dict[str, Any]) -> str:
    """The report as a fixed-width text table."""
    def f(v, fmt="{:.3g}"):
        return "-" if v is None else fmt.format(v)

    head = (f"{'N':>7} {'relax s':>8} {'steps':>6} {'fwd s':>8} {'rev s':>8} {'CG it':>6} {'deriv/rel':>9} "
            f"{'rev err':>8} {'FD s/par':>8} {'FD full s':>9} {'FD err':>8} {'FD/rev':>8} "
            f"{'unroll s':>8} {'unr MB':>7} {'unr err':>8} {'impl MB':>7} {'base MB':>7}")
    lines = [head]
    for row in report["rows"]:
        rel, imp, fd, un = row.get("relax", {}), row.get("implicit", {}), row.get("fd", {}), row.get("unrolled", {})
        lines.append(
            f"{row['n']:>7} {f(rel.get('relax_s')):>8} {f(rel.get('steps'), '{}'):>6} {f(imp.get('forward_s')):>8} "
            f"{f(imp.get('reverse_s')):>8} {f(imp.get('reverse_iterations'), '{}'):>6} "
            f"{f(row.get('derivative_over_relax')):>9} {f(imp.get('reverse_error'), '{:.1e}'):>8} "
            f"{f(fd.get('fd_per_param_s')):>8} {f(fd.get('fd_full_gradient_s_extrapolated')):>9} "
            f"{f(fd.get('fd_error'), '{:.1e}'):>8} {f(row.get('fd_over_reverse'), '{:.3g}'):>8} "
            f"{f(un.get('unrolled_s')):>8} {f(un.get('rss_mb'), '{:.0f}'):>7} "
            f"{f(un.get('unrolled_error'), '{:.1e}'):>8} {f(imp.get('rss_mb'), '{:.0f}'):>7} "
            f"{f(row.get('baseline', {}).get('rss_mb'), '{:.0f}'):>7}")
        for c in row.get("unrolled_curve", []):
            lines.append(f"{'':>7} unrolled {c['steps']:>6} steps: {f(c.get('unrolled_s'))} s, "
                         f"peak {f(c.get('rss_mb'), '{:.0f}')} MB{'  ' + c['error'] if c.get('error') else ''}")
        if row.get("derivative_shared_over_relax") is not None:
            lines.append(f"{'':>7} sparse solve: forward + reverse sharing one factorization (as a run does): "
                         f"{f(imp.get('shared_s'))} s, deriv/rel {f(row['derivative_shared_over_relax'])}")
        if row.get("derivative_ahead_over_relax") is not None:
            lines.append(f"{'':>7} ... with its ordering and analysis done beside the relaxation (as a run does; "
                         f"{'used' if imp.get('ahead_used') else 'NOT used: the predicted pattern missed'}): "
                         f"{f(imp.get('shared_ahead_s'))} s, deriv/rel {f(row['derivative_ahead_over_relax'])}")
        if any(fd.get("fd_contacts_changed", [])) and fd.get("fd_error") is not None:
            lines.append(f"{'':>7} FD err: a contact opens or closes within ± h for "
                         f"{sum(fd['fd_contacts_changed'])} of {len(fd['fd_contacts_changed'])} sampled diameters, "
                         "so the differences straddle a kink of x*(θ) (try a smaller --h)")
        for note in row.get("notes", []) + [un.get("skipped")] if un.get("skipped") else row.get("notes", []):
            lines.append(f"{'':>7} note: {note}")
        for key in ("relax", "implicit", "reference", "fd", "unrolled"):
            if isinstance(row.get(key), dict) and row[key].get("error"):
                lines.append(f"{'':>7} {key} failed: {row[key]['error']}")
    if any("peer" in row for row in report["rows"]):
        lines += ["", peer_table(report)]
    return "\n".join(lines)


def over_seeds(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per N over several starts (one :func:`run` report per seed): the
    relaxation's steps and seconds per seed, the peer's where there is one, and the
    medians. FIRE is chaotic: which code needs fewer steps follows the start, so a
    ratio of one start says little (2D bidisperse N = 131072, seeds 0–3: 1.15, 0.84,
    1.01, 1.14)."""
    out = []
    for n in [row["n"] for row in reports[0]["rows"]] if reports else []:
        rows = [(report["seed"], next(r for r in report["rows"] if r["n"] == n)) for report in reports]
        entry: dict[str, Any] = {"n": n, "seeds": [seed for seed, _ in rows],
                                 "steps": [row.get("relax", {}).get("steps") for _, row in rows],
                                 "relax_s": [row.get("relax", {}).get("relax_s") for _, row in rows]}
        if any("peer" in row for _, row in rows):
            entry["peer_steps"] = [row.get("peer", {}).get("steps") for _, row in rows]
            entry["peer_relax_s"] = [row.get("peer", {}).get("relax_s") for _, row in rows]
            entry["ratios"] = [row.get("relax_over_peer") for _, row in rows]
        for key in ("steps", "relax_s", "peer_steps", "peer_relax_s", "ratios"):
            if key in entry:
                values = [v for v in entry[key] if v is not None]
                entry[f"median_{key}"] = float(np.median(values)) if values else None
        per_step = [t / s for t, s in zip(entry["relax_s"], entry["steps"]) if t is not None and s]
        entry["median_s_per_step"] = float(np.median(per_step)) if per_step else None
        if "peer_steps" in entry:
            peer = [t / s for t, s in zip(entry["peer_relax_s"], entry["peer_steps"]) if t is not None and s]
            entry["median_peer_s_per_step"] = float(np.median(peer)) if peer else None
        out.append(entry)
    return out


def seeds_table(summary: list[dict[str, Any]], peer: str | None) -> str:
    """:func:`over_seeds` as text: per N, each start's steps (and ratio), then the medians."""
    def f(v, fmt="{:.3g}"):
        return "-" if v is None else fmt.format(v)

    name = peer or "peer"
    lines = [f"over {len(summary[0]['seeds']) if summary else 0} starts (seeds "
             f"{', '.join(map(str, summary[0]['seeds'])) if summary else ''}): medians, and each start"]
    head = f"{'N':>7} {'mdsens s':>9} {'steps':>7} {'ms/step':>8}"
    if any("ratios" in e for e in summary):
        head += f" {name + ' s':>9} {'steps':>7} {'ms/step':>8} {'ratio':>7}  ratio per start"
    else:
        head += "  steps per start"
    lines.append(head)
    for e in summary:
        line = (f"{e['n']:>7} {f(e.get('median_relax_s')):>9} {f(e.get('median_steps'), '{:.0f}'):>7} "
                f"{f(None if e.get('median_s_per_step') is None else 1e3 * e['median_s_per_step']):>8}")
        if "ratios" in e:
            line += (f" {f(e.get('median_peer_relax_s')):>9} {f(e.get('median_peer_steps'), '{:.0f}'):>7} "
                     f"{f(None if e.get('median_peer_s_per_step') is None else 1e3 * e['median_peer_s_per_step']):>8} "
                     f"{f(e.get('median_ratios')):>7}  " + ", ".join(f(r) for r in e["ratios"]))
        else:
            line += "  " + ", ".join(f(s, "{}") for s in e["steps"])
        lines.append(line)
    return "\n".join(lines)


def peer_table(report: dict[str, Any]) -> str:
    """mdsens's relaxation and the peer's side by side, and the cross-check at x*."""
    def f(v, fmt="{:.3g}"):
        return "-" if v is None else fmt.format(v)

    name = next((row["peer"].get("peer") for row in report["rows"] if "peer" in row and "peer" in row["peer"]),
                report.get("peer") or "peer")
    lines = [f"relaxation, mdsens vs {name} (same initial positions, ftol {report.get('ftol')} on max|F|); "
             f"{name} at mdsens's x*: relative differences of E and P, and max|F|",
             f"{'N':>7} {'mdsens s':>9} {'steps':>6} {'ms/step':>8} {name + ' s':>9} {'steps':>6} {'ms/step':>8} "
             f"{'ratio':>7} {'E/N mdsens':>11} {'E/N ' + name:>11} {'P mdsens':>10} {'P ' + name:>10} "
             f"{'dE @x*':>8} {'dP @x*':>8} {'|F| @x*':>8}"]
    for row in report["rows"]:
        if "peer" not in row:
            continue
        rel, pe = row.get("relax", {}), row["peer"]
        star = pe.get("at_x_star", {})
        ms = (1e3 * rel["relax_s"] / max(rel["steps"], 1)) if rel.get("relax_s") is not None else None
        lines.append(
            f"{row['n']:>7} {f(rel.get('relax_s')):>9} {f(rel.get('steps'), '{}'):>6} {f(ms):>8} "
            f"{f(pe.get('relax_s')):>9} {f(pe.get('steps'), '{}'):>6} "
            f"{f(None if pe.get('s_per_step') is None else 1e3 * pe['s_per_step']):>8} "
            f"{f(row.get('relax_over_peer'), '{:.3g}'):>7} {f(pe.get('mdsens_energy_per_particle'), '{:.6g}'):>11} "
            f"{f(pe.get('energy_per_particle'), '{:.6g}'):>11} {f(pe.get('mdsens_pressure'), '{:.6g}'):>10} "
            f"{f(pe.get('pressure'), '{:.6g}'):>10} {f(star.get('energy_rel_diff'), '{:.1e}'):>8} "
            f"{f(star.get('pressure_rel_diff'), '{:.1e}'):>8} {f(star.get('max_force'), '{:.1e}'):>8}")
        if pe.get("error"):
            lines.append(f"{'':>7} peer failed: {pe['error']}")
    lines.append(f"{'':>7} ratio = mdsens seconds / {name} seconds (compilation and {name} setup excluded); "
                 f"seconds and ratio: medians over rounds alternating the two")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
