"""The reference's own self-check, the first table of ``memcore verify``.

* Every op's hand-written backward against central finite differences, in float64, as
  the dot-product test of :mod:`memcore.gradcheck` on fixed sizes and seeds.
* The reference routing equivalences (when ``memcore.reference.routing`` is present):
  MRBP == BPTT and sparse replay == ``sab_bptt`` on drawn rollouts, float64, rel < 1e-9,
  through the numpy backend's routing methods.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from memcore.conformance.compare import worst
from memcore.conformance.tolerances import tolerance
from memcore.gradcheck import op_dot_product_test
from memcore.ops import OPS, get_op
from memcore.opspec import Sizes

__all__ = ["FD_ATOL", "FD_RTOL", "SelfCheckRow", "fd_rows", "format_rows", "routing_rows"]

FD_RTOL, FD_ATOL = 1e-6, 1e-9
# Fixed sizes: the default, then two that vary every glossary dimension.
_SIZES = (
    Sizes(),
    Sizes(B=1, L=2, K=3, H=1, dh=4, I=2, Hd=3, N=4, A=2),
    Sizes(B=3, L=1, K=2, H=3, dh=2, I=1, Hd=2, N=3, A=4),
)
_SAMPLES = {"dev": 2, "ci": 3, "nightly": 30}


@attrs.frozen
class SelfCheckRow:
    """One line of the self-check table."""

    name: str
    samples: int
    max_abs: float
    max_rel: float
    ok: bool
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def fd_rows(ops: Sequence[str] | None = None, profile: str = "ci") -> list[SelfCheckRow]:
    """The dot-product test of each op on ``_SAMPLES[profile]`` fixed (sizes, seed) pairs."""
    rows = []
    for name in ops or list(OPS):
        spec = get_op(name)
        abs_err, rel_err, ok, detail = 0.0, 0.0, True, ""
        n = _SAMPLES.get(profile, 3)
        for i in range(n):
            z = _SIZES[i % len(_SIZES)]
            rng = np.random.default_rng(1000 + i)
            sample = spec.sample(rng, z, "float64")
            try:
                r = op_dot_product_test(name, sample, rng)
            except Exception as exc:  # noqa: BLE001 - a crash is a failed row, reported
                ok, detail = False, f"{type(exc).__name__}: {exc}"
                continue
            abs_err, rel_err = max(abs_err, r.abs_error), max(rel_err, r.rel_error)
            if not r.ok(FD_RTOL, FD_ATOL) and ok:
                ok = False
                detail = (
                    f"sizes {z}, seed {1000 + i}: <u, J^T v> = {r.analytic!r}, "
                    f"finite difference {r.numeric!r}"
                )
        rows.append(SelfCheckRow(name, n, abs_err, rel_err, ok, detail))
    return rows


def routing_rows(profile: str = "ci", examples: int | None = None) -> list[SelfCheckRow]:
    """MRBP == BPTT and sparse replay == sab_bptt of the reference (empty without routing)."""
    if importlib.util.find_spec("memcore.reference.routing") is None:
        return []
    from memcore.conformance.routing_checks import reference_backend
    from memcore.conformance.runner import EXAMPLES, drive
    from memcore.conformance.strategies import memformer_cases, sab_cases

    ref = reference_backend()
    layouts, per_layout = EXAMPLES[profile]["routing"]
    n = examples or layouts * per_layout
    tol = tolerance("routing", "float64", "routing")
    rows = []
    pairs = (
        ("mrbp == bptt", memformer_cases(), "mrbp", "bptt"),
        ("sab_sparse_replay == sab_bptt", sab_cases(), "sab_sparse_replay", "sab_bptt"),
    )
    for label, strategy, a, b in pairs:
        missing = [m for m in (a, b) if not callable(getattr(ref, m, None))]
        if missing:
            rows.append(
                SelfCheckRow(
                    label,
                    0,
                    float("nan"),
                    float("nan"),
                    False,
                    f"the numpy backend has no routing method {', '.join(missing)}",
                )
            )
            continue
        state: dict[str, Any] = {"comps": [], "detail": "", "count": 0}
        drive(
            strategy,
            n,
            "ci" if profile != "nightly" else profile,
            _equivalence_body(ref, a, b, tol, state),
        )
        comps = state["comps"]
        w = worst(comps)
        rows.append(
            SelfCheckRow(
                label,
                state["count"],
                max((c.max_abs for c in comps), default=0.0),
                max((c.max_rel for c in comps), default=0.0),
                not state["detail"] and (w is None or w.ok),
                state["detail"],
            )
        )
    return rows


def _equivalence_body(ref: Any, a: str, b: str, tol: Any, state: dict[str, Any]) -> Any:
    from memcore.conformance.routing_checks import compare_results

    def body(case: Any) -> None:
        state["count"] += 1
        try:
            comps = compare_results(ref, _call(ref, a, case), _call(ref, b, case), ref, tol)
        except Exception as exc:  # noqa: BLE001 - a crash is a failed row, reported
            state["detail"] = state["detail"] or f"{case.label}: {type(exc).__name__}: {exc}"
            return
        state["comps"] += comps
        bad = [c for c in comps if not c.ok]
        if bad and not state["detail"]:
            state["detail"] = f"{case.label}: {bad[0].describe()}"

    return body


def _call(ref: Any, method: str, case: Any) -> Any:
    if case.step == "memformer":
        kw = {
            "config": case.config,
            "loss": case.loss,
            "resets": case.resets,
            "token_mask": case.token_mask,
            "truncate_every": case.truncate_every,
        }
        if method == "bptt":
            return ref.bptt("memformer", case.params, case.xs, case.state0, case.targets, **kw)
        return ref.mrbp(case.params, case.xs, case.state0, case.targets, **kw)
    return getattr(ref, method)(
        case.params, case.xs, case.state0, case.targets, config=case.config, loss=case.loss
    )


def format_rows(title: str, first: str, rows: Sequence[SelfCheckRow]) -> str:
    """A small fixed-width table with a title line; failures' details under it."""
    head = [first, "samples", "max abs err", "max rel err", "status"]
    body = [
        [r.name, str(r.samples), f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", "ok" if r.ok else "FAIL"]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = [
        title,
        "  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    lines += [f"  FAIL  {r.name}: {r.detail}" for r in rows if not r.ok]
    return "\n".join(lines)
