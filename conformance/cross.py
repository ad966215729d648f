"""Cross-framework checks: two backends on the same inputs, compared with each other.

Each backend is already measured against the reference; this pins that they also agree
with each other (e.g. torch vs jax), for every op's forward and VJP (same cotangents) and
for the routing drivers (MRBP for Memformer, sparse replay for SAB). Both sides see the
same float64 draws cast down to the working dtype; the tolerance is twice the dtype's
VJP (or routing) row, since each side carries its own error against the reference.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from hypothesis import strategies as st

from memcore.conformance.checks import host, to_backend
from memcore.conformance.compare import Comparison, compare, failure, worst
from memcore.conformance.routing_checks import call_driver, compare_results, driver_inputs
from memcore.conformance.runner import EXAMPLES, CheckResult, drive
from memcore.conformance.strategies import build_case, memformer_layouts, sab_layouts, seeds, sizes
from memcore.conformance.tolerances import Tol, tolerance
from memcore.ops import OPS, get_op

__all__ = ["cross_check"]

_ROUTING = {"memformer": ("mrbp", memformer_layouts), "sab": ("sab_sparse_replay", sab_layouts)}


def _doubled(t: Tol) -> Tol:
    return Tol(rtol=2 * t.rtol, atol=2 * t.atol)


def _tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _op_example(a: Any, b: Any, op: str, dtype: str, devs: tuple[str, str], sample: Any, seed: int) -> list[Comparison]:
    spec = get_op(op)
    tol = _doubled(tolerance(op, dtype, "vjp"))
    sides = []
    rng = np.random.default_rng(seed)
    outs64 = None
    for backend, dev in ((a, devs[0]), (b, devs[1])):
        ins = tuple(to_backend(backend, x, dtype, dev) for x in sample.inputs)
        at = {k: to_backend(backend, v, dtype, dev) for k, v in sample.attrs.items()}
        out = _tuple(backend.forward(op, *ins, **at))
        if outs64 is None:
            outs64 = [host(backend, o) for o in out]
            cts = [rng.standard_normal(o.shape) for o in outs64]
        ct = [to_backend(backend, c, dtype, dev) for c in cts]
        _, grads = backend.vjp(op, ins, at, tuple(ct) if spec.multi_output else ct[0])
        sides.append((backend, out, _tuple(grads)))
    (ba, oa, ga), (bb, ob, gb) = sides
    comps = [compare(f"out[{n}]", host(ba, x), host(bb, y), tol) for (n, _), x, y in zip(spec.outputs, oa, ob)]
    for t, x, y in zip(spec.inputs, ga, gb):
        if x is None and y is None:
            continue
        if x is None or y is None:
            comps.append(failure(f"grad[{t.name}]", "one side returned None", tol))
            continue
        comps.append(compare(f"grad[{t.name}]", host(ba, x), host(bb, y), tol))
    return comps


def _result(pair: str, dev: str, dtype: str, op: str, check: str, comps: list[Comparison],
            examples: int, message: str, seconds: float, labels: list[str]) -> CheckResult:
    ok = not message and all(c.ok for c in comps)
    w = worst(comps)
    example = ""
    if not ok and w is not None and not w.ok:
        message, example = w.describe(), labels[comps.index(w)]
    return CheckResult(
        f"{pair}-{dev}-{dtype}-{op}-{check}", pair, dev, dtype, op, check,
        "passed" if ok else "failed", message, examples, w, example, seconds,
    )


def cross_check(a: Any, b: Any, *, devices: tuple[str, str], dtypes: list[str], profile: str,
                ops: list[str] | None = None, routing: bool = True,
                seed: int | None = None) -> list[CheckResult]:
    """Compare backends ``a`` and ``b`` on the same draws for every op (or ``ops``) and,
    with ``routing``, the MRBP and sparse-replay drivers (``seed``: see ``runner.drive``).

    Results carry ``backend`` = "a~b", the pair, which the report's first column shows."""
    pair = f"{a.name}~{b.name}"
    dev = devices[0] if devices[0] == devices[1] else f"{devices[0]}~{devices[1]}"
    results: list[CheckResult] = []
    for dtype in dtypes:
        for op in list(OPS) if ops is None else ops:
            results.append(_op_unit(a, b, op, dtype, devices, pair, dev, profile, seed))
        for step, (method, layout_strategy) in (_ROUTING.items() if routing else ()):
            results.append(_routing_unit(a, b, step, method, layout_strategy, dtype, devices, pair,
                                         dev, profile, seed))
    return results


def _op_unit(a: Any, b: Any, op: str, dtype: str, devices: tuple[str, str], pair: str, dev: str,
             profile: str, seed: int | None = None) -> CheckResult:
    layouts, per = EXAMPLES[profile]["op"]
    comps: list[Comparison] = []
    labels: list[str] = []
    state = {"n": 0, "msg": ""}
    start = time.perf_counter()

    def body(drawn: Any) -> None:
        z, seed = drawn
        for k in range(per):
            sample = get_op(op).sample(np.random.default_rng(seed + k), z, "float64")
            try:
                got = _op_example(a, b, op, dtype, devices, sample, seed + k)
                comps.extend(got)
                labels.extend([f"{z}, seed={seed + k}"] * len(got))
            except Exception as exc:  # noqa: BLE001 - reported as the check's failure
                state["msg"] = state["msg"] or f"{type(exc).__name__}: {exc}"
            state["n"] += 1

    drive(st.tuples(sizes(), seeds), layouts, profile, body, seed)
    return _result(pair, dev, dtype, op, "cross_vjp", comps, int(state["n"]), str(state["msg"]),
                   time.perf_counter() - start, labels)


def _routing_unit(a: Any, b: Any, step: str, method: str, layout_strategy: Any, dtype: str,
                  devices: tuple[str, str], pair: str, dev: str, profile: str,
                  seed: int | None = None) -> CheckResult:
    layouts, per = EXAMPLES[profile]["routing"]
    comps: list[Comparison] = []
    labels: list[str] = []
    state = {"n": 0, "msg": ""}
    start = time.perf_counter()
    tol = _doubled(tolerance(step, dtype, "routing"))

    def body(drawn: Any) -> None:
        layout, seed = drawn
        for k in range(per):
            case = build_case(layout, seed + k)
            try:
                got = call_driver(a, method, case, driver_inputs(a, case, dtype, devices[0]))
                want = call_driver(b, method, case, driver_inputs(b, case, dtype, devices[1]))
                found = compare_results(a, got, want, b, tol)
                comps.extend(found)
                labels.extend([case.label] * len(found))
            except Exception as exc:  # noqa: BLE001
                state["msg"] = state["msg"] or f"{type(exc).__name__}: {exc}"
            state["n"] += 1

    drive(st.tuples(layout_strategy(), seeds), layouts, profile, body, seed)
    return _result(pair, dev, dtype, step, f"cross_{method}", comps, int(state["n"]),
                   str(state["msg"]), time.perf_counter() - start, labels)
