"""Run the conformance checks of one backend on one device, over dtypes, per profile.

Work is split into units: one per (op, dtype) and one per (routing step, dtype). A unit
draws examples with hypothesis (sizes and seeds; values in float64 from the op's sampler)
and runs all its checks on each; a check's result keeps its worst comparison over all
examples and the first failing example. Error inputs run once per unit.

The backend hooks it consults (``pin_numerics``, ``numerics_settings``, ``device_of``)
are documented in :mod:`memcore.conformance.hooks`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import hypothesis
import numpy as np
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from memcore.conformance.checks import OP_CHECKS, Outcome, op_errors, op_example
from memcore.conformance.compare import Comparison, worst
from memcore.conformance.hooks import dtype_skip_reason, pin_numerics, resolve_device
from memcore.conformance.profiles import profile_name, register_profiles
from memcore.conformance.result import CheckResult
from memcore.conformance.routing_checks import ROUTING_CHECKS, routing_errors, routing_example
from memcore.conformance.strategies import (
    build_case,
    memformer_layouts,
    sab_layouts,
    scaled,
    scales,
    seeds,
    sizes,
)
from memcore.conformance.xfails import XfailList
from memcore.errors import MemcoreError
from memcore.ops import OPS, get_op

__all__ = [
    "EXAMPLES",
    "CheckResult",
    "Unit",
    "check_id",
    "drive",
    "dtype_skip_reason",
    "pin_numerics",
    "plan",
    "resolve_device",
    "run_backend",
    "run_unit",
    "unit_results",
]

# Per profile and unit kind: (layouts, seeds per layout). A layout is one drawn set of
# sizes (and, for routing, config and options); each seed fills it with new values.
# Shapes repeat within a layout, so a jitting backend (jax) compiles once per layout.
EXAMPLES = {
    "dev": {"op": (3, 2), "routing": (2, 2)},
    "ci": {"op": (5, 3), "routing": (3, 2)},
    "nightly": {"op": (334, 3), "routing": (50, 2)},
}
CHECK_DTYPES = ("float64", "float32", "bfloat16", "float16")


@attrs.frozen
class Unit:
    """A (op or routing step, dtype) pair and the checks it produces."""

    kind: str  # "op" or "routing"
    op: str
    dtype: str
    checks: tuple[str, ...]


def check_id(backend: str, device: str, dtype: str, op: str, check: str) -> str:
    """The stable id of one check (see :mod:`memcore.conformance.xfails`)."""
    return f"{backend}-{device}-{dtype}-{op}-{check}"


def plan(
    ops: Sequence[str] | None, dtypes: Sequence[str], routing: bool | Sequence[str]
) -> list[Unit]:
    """The units to run, ops first, in registry order.

    ``ops``: op names (None: every op). ``routing``: every routing step (True), none
    (False), or the named steps ("memformer", "sab").
    """
    names = list(OPS) if ops is None else [get_op(o).name for o in ops]
    units = [Unit("op", o, d, OP_CHECKS) for d in dtypes for o in names]
    if routing is True or routing is False:
        steps = list(ROUTING_CHECKS) if routing else []
    else:
        steps = list(routing)
        for s in steps:
            if s not in ROUTING_CHECKS:
                raise MemcoreError(
                    f"`routing` steps must be among {', '.join(ROUTING_CHECKS)}. Received: {s!r}"
                )
    units += [Unit("routing", s, d, ROUTING_CHECKS[s]) for d in dtypes for s in steps]
    return units


def drive(
    strategy: st.SearchStrategy,
    n: int,
    profile: str,
    body: Callable[[Any], None],
    seed: int | None = None,
) -> None:
    """Call ``body`` on ``n`` examples of ``strategy`` drawn under hypothesis profile ``profile``.

    ``seed`` fixes hypothesis's random source (the same seed draws the same examples, which
    is how ``memcore verify --seed`` replays a run); None keeps the profile's policy (``ci``
    is derandomized, so it always draws the same examples).
    """
    # No exception escapes ``body``, so hypothesis neither shrinks nor stores anything:
    # it is used as the drawing engine, with the profile's seed policy.
    register_profiles()
    base = settings.get_profile(profile)
    extra = {} if seed is None else {"derandomize": False}
    test = given(strategy)(body)
    if seed is not None:
        test = hypothesis.seed(seed)(test)
    run = settings(
        base, max_examples=n, database=None, phases=(Phase.explicit, Phase.generate), **extra
    )(test)
    run()


@attrs.define
class _Acc:
    """A check over its examples: the worst comparison and, on failure, the worst failing
    example (the one whose comparison the table's cell shows, when it has values)."""

    ok: bool = True
    examples: int = 0
    comps: list[Comparison] = attrs.field(factory=list)
    message: str = ""
    failed_example: str = ""

    def add(self, outcome: Outcome, label: str) -> None:
        self.examples += 1
        w = worst(outcome.comparisons)
        became_worst = w is not None and (not self.comps or worst(self.comps + [w]) is w)
        if became_worst:
            self.comps = [w]  # type: ignore[list-item]
        if not outcome.ok and (self.ok or became_worst):
            self.ok, self.message, self.failed_example = False, outcome.message, label


def run_unit(
    backend: Any,
    unit: Unit,
    *,
    device: str,
    profile: str,
    layouts: int | None = None,
    seed: int | None = None,
) -> dict[str, _Acc]:
    """Run one unit; returns an accumulator per check (internal to the runner and plugin)."""
    accs = {c: _Acc() for c in unit.checks}
    n_layouts, n_seeds = EXAMPLES[profile][unit.kind]
    drawn = st.lists(seeds, min_size=n_seeds, max_size=n_seeds, unique=True)

    def record(outcomes: dict[str, Outcome], label: str) -> None:
        for check, outcome in outcomes.items():
            accs[check].add(outcome, label)

    def crashed(exc: Exception) -> dict[str, Outcome]:
        return {
            c: Outcome(False, (), f"{type(exc).__name__}: {exc}")
            for c in unit.checks
            if c != "errors"
        }

    if unit.kind == "op":
        spec = get_op(unit.op)

        def body(example: tuple[Any, list[int], float]) -> None:
            z, values, drawn_scale = example
            for k, seed in enumerate(values):
                rng = np.random.default_rng(seed)
                scale = 1.0 if k == 0 else drawn_scale  # each layout runs at unit scale too
                sample = scaled(spec.sample(rng, z, "float64"), scale)
                try:
                    outcomes = op_example(backend, unit.op, unit.dtype, device, sample, rng)
                except Exception as exc:  # noqa: BLE001 - e.g. conversion failed: every check fails
                    outcomes = crashed(exc)
                record(outcomes, f"{z}, scale={scale:g}, seed={seed}")

        drive(st.tuples(sizes(), drawn, scales), layouts or n_layouts, profile, body, seed)
        accs["errors"].add(
            _safe(lambda: op_errors(backend, unit.op, unit.dtype, device)), "fixed sample"
        )
        return accs

    def rbody(example: tuple[Any, list[int]]) -> None:
        layout, values = example
        for seed in values:
            case = build_case(layout, seed)
            try:
                outcomes = routing_example(backend, case, unit.dtype, device)
            except Exception as exc:  # noqa: BLE001
                outcomes = crashed(exc)
            record(outcomes, case.label)

    strategy = memformer_layouts() if unit.op == "memformer" else sab_layouts()
    drive(st.tuples(strategy, drawn), layouts or n_layouts, profile, rbody, seed)
    case = _fixed_case(unit.op)
    accs["errors"].add(_safe(lambda: routing_errors(backend, case, unit.dtype, device)), case.label)
    return accs


def _safe(fn: Callable[[], Outcome]) -> Outcome:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        return Outcome(False, (), f"{type(exc).__name__}: {exc}")


def _fixed_case(step: str) -> Any:
    # A deterministic rollout for the error checks: the first example of a derandomized run.
    found: list[Any] = []

    def keep(layout: Any) -> None:
        found.append(layout)

    drive(memformer_layouts() if step == "memformer" else sab_layouts(), 1, "ci", keep)
    return build_case(found[0], 0)


def _result(
    backend_name: str,
    device: str,
    unit: Unit,
    check: str,
    acc: _Acc,
    seconds: float,
    xfails: XfailList,
) -> CheckResult:
    cid = check_id(backend_name, device, unit.dtype, unit.op, check)
    status = "passed" if acc.ok else "failed"
    reason = acc.message
    entry = xfails.match(cid)
    if entry is not None:
        status = "xfailed" if status == "failed" else "xpassed"
        reason = f"{entry.reason} ({entry.source})" + (
            f": {acc.message}" if acc.message and status == "xfailed" else ""
        )
    return CheckResult(
        cid,
        backend_name,
        device,
        unit.dtype,
        unit.op,
        check,
        status,
        reason,
        acc.examples,
        acc.comps[0] if acc.comps else None,
        acc.failed_example,
        seconds,
    )


def unit_results(
    backend: Any,
    unit: Unit,
    *,
    device: str,
    profile: str,
    xfails: XfailList,
    layouts: int | None = None,
    skip_reason: str = "",
    seed: int | None = None,
) -> list[CheckResult]:
    """The CheckResults of one unit (skipped with ``skip_reason`` when it is given)."""
    name = getattr(backend, "name", type(backend).__name__)
    if skip_reason:
        return [
            CheckResult(
                check_id(name, device, unit.dtype, unit.op, c),
                name,
                device,
                unit.dtype,
                unit.op,
                c,
                "skipped",
                skip_reason,
            )
            for c in unit.checks
        ]
    start = time.perf_counter()
    accs = run_unit(backend, unit, device=device, profile=profile, layouts=layouts, seed=seed)
    seconds = time.perf_counter() - start
    return [_result(name, device, unit, c, accs[c], seconds, xfails) for c in unit.checks]


def run_backend(
    backend: Any,
    *,
    device: str | None = None,
    dtypes: Sequence[str] | None = None,
    profile: str | None = None,
    ops: Sequence[str] | None = None,
    routing: bool | Sequence[str] = True,
    xfails: XfailList | None = None,
    layouts: int | None = None,
    progress: Callable[[int, int, Unit], None] | None = None,
    seed: int | None = None,
) -> list[CheckResult]:
    """Run every unit of the plan on ``backend``; never raises for a failing check.

    Args:
        backend: the backend instance.
        device: a device of ``backend.devices()`` (default cpu).
        dtypes: dtypes to check (default: the supported ones among float64, float32).
        profile: dev, ci or nightly (default ``$MEMCORE_HYPOTHESIS_PROFILE`` or dev).
        ops: op names (default all); routing: include the routing steps (or the named ones).
        xfails: expected failures.
        layouts: override the profile's number of drawn layouts per unit (seeds per layout stay).
        progress: ``progress(done, total, unit)`` called before each unit.
        seed: hypothesis seed of every unit's draws (None: the profile's policy).

    Raises:
        MemcoreError: unknown device, dtype, op or profile.
    """
    device = resolve_device(backend, device)
    profile = profile_name(profile)
    if dtypes is None:
        supported = tuple(backend.capabilities(device).dtypes)
        dtypes = [d for d in ("float64", "float32") if d in supported]
    for d in dtypes:
        if d not in CHECK_DTYPES:
            raise MemcoreError(
                f"`dtype` must be one of {', '.join(CHECK_DTYPES)}. Received: dtype={d!r}"
            )
    xfails = xfails or XfailList()
    units = plan(ops, dtypes, routing)
    results: list[CheckResult] = []
    for i, unit in enumerate(units):
        if progress is not None:
            progress(i, len(units), unit)
        results += unit_results(
            backend,
            unit,
            device=device,
            profile=profile,
            xfails=xfails,
            layouts=layouts,
            skip_reason=dtype_skip_reason(backend, device, unit.dtype),
            seed=seed,
        )
    if progress is not None and units:
        progress(len(units), len(units), units[-1])
    return results
