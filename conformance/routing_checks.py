"""Routing equivalences of a backend, checked through the routing contract.

Every backend (the reference's ``numpy`` one included) exposes ``bptt``, ``mrbp``,
``sab_bptt`` and ``sab_sparse_replay`` returning a :class:`memcore.routing_types.RoutingResult`.
On one drawn rollout (float64, cast down to the working dtype, read back for the reference):

* memformer ``mrbp_vs_own_bptt``: the backend's MRBP equals its own BPTT;
* memformer ``mrbp_vs_ref_bptt``: the backend's MRBP equals the reference's BPTT (float64);
* sab ``sparse_replay_vs_own_sab_bptt``: its sparse replay equals its own ``sab_bptt``;
* sab ``sparse_replay_vs_ref``: its sparse replay equals the reference's;
* sab ``replayed_chunks``: it replays the same chunks as the reference (as a set);
* ``errors`` (once per dtype): mismatched T and a wrong state shape raise ``MemcoreError``.

Compared: the loss, every parameter gradient, the initial-state gradient and the final
state, within the ``routing`` row of the tolerance table. A backend that lacks a method
fails the checks that need it, with the reason.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np

from memcore.conformance.checks import Outcome, host, to_backend
from memcore.conformance.compare import Comparison, compare, failure
from memcore.conformance.strategies import RoutingCase
from memcore.conformance.tolerances import Tol, tolerance
from memcore.errors import MemcoreError

__all__ = [
    "ROUTING_CHECKS",
    "compare_results",
    "reference_backend",
    "routing_errors",
    "routing_example",
]

ROUTING_CHECKS = {
    "memformer": ("mrbp_vs_own_bptt", "mrbp_vs_ref_bptt", "errors"),
    "sab": ("sparse_replay_vs_own_sab_bptt", "sparse_replay_vs_ref", "replayed_chunks", "errors"),
}
_NEEDS = {
    "mrbp_vs_own_bptt": ("mrbp", "bptt"),
    "mrbp_vs_ref_bptt": ("mrbp",),
    "sparse_replay_vs_own_sab_bptt": ("sab_sparse_replay", "sab_bptt"),
    "sparse_replay_vs_ref": ("sab_sparse_replay",),
    "replayed_chunks": ("sab_sparse_replay",),
}
_reference: Any = None


def reference_backend() -> Any:
    """The reference behind the routing contract: a plain ``NumpyBackend`` (float64)."""
    global _reference
    if _reference is None:
        from memcore.backends.numpy import NumpyBackend

        _reference = NumpyBackend()
    return _reference


def _missing(backend: Any, methods: tuple[str, ...], who: str) -> str:
    gone = [m for m in methods if not callable(getattr(backend, m, None))]
    if not gone:
        return ""
    return (
        f"{who} has no routing method {', '.join('`' + m + '`' for m in gone)} "
        "(the routing contract: bptt, mrbp, sab_bptt, sab_sparse_replay)"
    )


def driver_inputs(backend: Any, case: RoutingCase, dtype: str, device: str) -> dict[str, Any]:
    def conv(x: Any) -> Any:
        if x is None:
            return None
        if isinstance(x, tuple):
            return tuple(conv(v) for v in x)
        return to_backend(backend, x, dtype, device)

    return {
        "params": {k: conv(v) for k, v in case.params.items()},
        "xs": conv(case.xs),
        "state0": conv(case.state0),
        "targets": conv(case.targets),
        "resets": conv(case.resets),
        "token_mask": conv(case.token_mask),
    }


def _read_back(backend: Any, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: _read_back(backend, v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_read_back(backend, v) for v in value)
    h = host(backend, value)
    return h.astype(np.float64) if h.dtype.kind == "f" else h


def call_driver(backend: Any, method: str, case: RoutingCase, arrays: dict[str, Any]) -> Any:
    p, xs, s0, tg = arrays["params"], arrays["xs"], arrays["state0"], arrays["targets"]
    if case.step == "memformer":
        kw = {
            "config": case.config,
            "loss": case.loss,
            "resets": arrays["resets"],
            "token_mask": arrays["token_mask"],
            "truncate_every": case.truncate_every,
        }
        if method == "bptt":
            return backend.bptt("memformer", p, xs, s0, tg, **kw)
        return backend.mrbp(p, xs, s0, tg, **kw)
    return getattr(backend, method)(p, xs, s0, tg, config=case.config, loss=case.loss)


def _states(name: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, (tuple, list)):
        return [(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return [(name, value)]


def compare_results(
    backend: Any, got: Any, want: Any, want_backend: Any, tol: Tol
) -> list[Comparison]:
    """Loss, every gradient, the initial-state gradient and the final state of two results."""
    comps = [compare("loss", host(backend, got.loss), host(want_backend, want.loss), tol)]
    grads = dict(got.grads)
    for k, v in want.grads.items():
        if k not in grads:
            comps.append(failure(f"grads[{k}]", "missing from the backend's grads", tol))
            continue
        g = grads[k]
        comps.append(
            compare(
                f"grads[{k}]", None if g is None else host(backend, g), host(want_backend, v), tol
            )
        )
    for field in ("d_state0", "final_state"):
        want_parts = _states(field, getattr(want, field))
        got_parts = _states(field, getattr(got, field))
        if len(got_parts) != len(want_parts):
            comps.append(
                failure(field, f"{len(got_parts)} arrays, expected {len(want_parts)}", tol)
            )
            continue
        for (name, g), (_, w) in zip(got_parts, want_parts):
            comps.append(
                compare(name, None if g is None else host(backend, g), host(want_backend, w), tol)
            )
    return comps


def _outcome(comps: list[Comparison]) -> Outcome:
    bad = [c for c in comps if not c.ok]
    return Outcome(not bad, tuple(comps), "; ".join(c.describe() for c in bad[:3]))


def routing_example(backend: Any, case: RoutingCase, dtype: str, device: str) -> dict[str, Outcome]:
    """Run the equivalence checks of ``case.step`` on one rollout; one Outcome per check."""
    ref = reference_backend()
    checks = [c for c in ROUTING_CHECKS[case.step] if c != "errors"]
    out: dict[str, Outcome] = {}
    arrays = driver_inputs(backend, case, dtype, device)
    # The reference runs in float64 on the values the backend received.
    ref_case = _float64_case(backend, case, arrays)
    ref_arrays = driver_inputs(ref, ref_case, "float64", "cpu")
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    main = "mrbp" if case.step == "memformer" else "sab_sparse_replay"
    own = "bptt" if case.step == "memformer" else "sab_bptt"
    ref_method = "bptt" if case.step == "memformer" else "sab_sparse_replay"

    def run(who: Any, method: str, key: str, c: RoutingCase, a: dict[str, Any]) -> None:
        if not callable(getattr(who, method, None)):
            return
        try:
            results[key] = call_driver(who, method, c, a)
        except Exception as exc:  # noqa: BLE001 - reported as the check's failure
            errors[key] = f"{method} raised {type(exc).__name__}: {exc}"

    run(backend, main, "main", case, arrays)
    run(backend, own, "own", case, arrays)
    run(ref, ref_method, "ref", ref_case, ref_arrays)
    for check in checks:
        why = _missing(backend, _NEEDS[check], f"backend {getattr(backend, 'name', '?')!r}")
        if not why and check not in ("mrbp_vs_own_bptt", "sparse_replay_vs_own_sab_bptt"):
            why = _missing(ref, (ref_method,), "the reference numpy backend")
        keys = ("main", "own") if check.endswith(("own_bptt", "own_sab_bptt")) else ("main", "ref")
        why = why or "; ".join(errors[k] for k in keys if k in errors)
        if why:
            out[check] = Outcome(False, (), why)
            continue
        if check == "replayed_chunks":
            got, want = results["main"].replayed_chunks, results["ref"].replayed_chunks
            ok = got is not None and sorted(set(got)) == sorted(want) and len(set(got)) == len(got)
            out[check] = Outcome(
                ok, (), "" if ok else f"replayed chunks {got} != reference {sorted(want)}"
            )
            continue
        if keys[1] == "own":
            comps = compare_results(
                backend,
                results["main"],
                results["own"],
                backend,
                tolerance(case.step, dtype, "routing"),
            )
        else:
            comps = compare_results(
                backend,
                results["main"],
                results["ref"],
                ref,
                tolerance(case.step, dtype, "routing"),
            )
        out[check] = _outcome(comps)
    return out


def _float64_case(backend: Any, case: RoutingCase, arrays: dict[str, Any]) -> RoutingCase:
    return attrs.evolve(
        case,
        params=_read_back(backend, arrays["params"]),
        xs=_read_back(backend, arrays["xs"]),
        state0=_read_back(backend, arrays["state0"]),
        targets=_read_back(backend, arrays["targets"]),
    )


def routing_errors(backend: Any, case: RoutingCase, dtype: str, device: str) -> Outcome:
    """Mismatched T between xs and targets, and a wrong state shape, must raise MemcoreError."""
    methods = ("mrbp", "bptt") if case.step == "memformer" else ("sab_sparse_replay", "sab_bptt")
    why = _missing(backend, methods, f"backend {getattr(backend, 'name', '?')!r}")
    if why:
        return Outcome(False, (), why)
    short = case.targets[:-1] if case.targets.shape[0] > 1 else np.concatenate([case.targets] * 2)
    if case.step == "memformer":
        m0 = case.state0
        bad_state = m0[:, :, :-1] if m0.shape[-1] > 1 else np.concatenate([m0] * 2, axis=-1)
    else:
        h0, c0 = case.state0
        bad_state = (np.concatenate([h0, h0], axis=-1), c0)
    bad_cases = {
        "targets with another T": attrs.evolve(case, targets=short),
        "state0 of the wrong shape": attrs.evolve(case, state0=bad_state),
    }
    problems = []
    for method in methods:
        for label, bad in bad_cases.items():
            try:
                call_driver(backend, method, bad, driver_inputs(backend, bad, dtype, device))
            except MemcoreError:
                continue
            except Exception as exc:  # noqa: BLE001
                problems.append(
                    f"{method} with {label}: raised {type(exc).__name__} instead of MemcoreError: {exc}"
                )
            else:
                problems.append(f"{method} with {label}: did not raise")
    return Outcome(
        not problems,
        (),
        "; ".join(problems[:3]) if problems else f"{len(methods) * len(bad_cases)} cases",
    )
