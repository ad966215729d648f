"""Array comparisons that say how far off and where, never just True or False.

An element passes when ``|actual - expected| <= atol + rtol * |expected|``. A comparison
reports the largest absolute error, the largest relative error (magnitudes floored at
``atol / rtol``, below which the absolute tolerance governs, so an error at an exact zero
is not hidden), the worst element's index (by error over its allowed
bound) with both values there, and the shapes when they differ.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import attrs
import numpy as np

from memcore.conformance.tolerances import Tol

__all__ = ["Comparison", "compare", "failure", "worst"]


@attrs.frozen
class Comparison:
    """The outcome of comparing one array (or scalar) with its expected value.

    Attributes:
        name: what was compared, e.g. "grad[memory]" or "out".
        ok: every element within tolerance (and shapes equal, NaN where expected).
        max_abs: the largest |actual - expected|.
        max_rel: the largest |actual - expected| / max(|expected|, atol / rtol).
        ratio: the largest error / (atol + rtol |expected|); at most 1 when ``ok``.
        where: index of the element with the largest ratio (None for empty arrays).
        actual_at / expected_at: the two values at ``where``.
        tol: the tolerance applied.
        reason: why it failed when it is not a value mismatch (shape, missing array).
    """

    name: str
    ok: bool
    max_abs: float
    max_rel: float
    ratio: float
    where: tuple[int, ...] | None
    actual_at: float | None
    expected_at: float | None
    tol: Tol
    reason: str = ""

    def describe(self) -> str:
        """One line: name, errors, where, and the tolerance."""
        if self.reason:
            return f"{self.name}: {self.reason}"
        at = ""
        if self.where is not None:
            at = f" at {list(self.where)} (actual {self.actual_at:.9g}, expected {self.expected_at:.9g})"
        basis = f" = {self.tol.basis}" if self.tol.basis else ""
        return (
            f"{self.name}: max abs err {self.max_abs:.3e}, max rel err {self.max_rel:.3e}{at}; "
            f"rtol={self.tol.rtol:g}, atol={self.tol.atol:.3g}{basis}"
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (inf and NaN become strings)."""
        return {
            "name": self.name,
            "ok": self.ok,
            "max_abs": _num(self.max_abs),
            "max_rel": _num(self.max_rel),
            "ratio": _num(self.ratio),
            "where": None if self.where is None else list(self.where),
            "actual_at": _num(self.actual_at),
            "expected_at": _num(self.expected_at),
            "rtol": self.tol.rtol,
            "atol": self.tol.atol,
            "tol_basis": self.tol.basis,
            "reason": self.reason,
        }


def _num(v: float | None) -> float | str | None:
    if v is None or math.isfinite(v):
        return v
    return str(v)


def failure(name: str, reason: str, tol: Tol) -> Comparison:
    """A comparison that could not be made (missing array, wrong shape, wrong type)."""
    return Comparison(name, False, math.inf, math.inf, math.inf, None, None, None, tol, reason)


def compare(name: str, actual: Any, expected: Any, tol: Tol) -> Comparison:
    """Compare ``actual`` with ``expected`` elementwise on the host, in float64.

    Args:
        name: label used in reports.
        actual: the backend's value, already converted to NumPy (any float dtype).
        expected: the reference value (NumPy, float64).
        tol: rtol and atol.
    """
    if actual is None:
        return failure(name, "missing (None) where the reference has a value", tol)
    a = np.asarray(actual)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        return failure(name, f"shape {a.shape} != expected {e.shape}", tol)
    if a.dtype.kind not in "fiub":
        return failure(name, f"dtype {a.dtype} is not numeric", tol)
    a = a.astype(np.float64)
    if a.size == 0:
        return Comparison(name, True, 0.0, 0.0, 0.0, None, None, None, tol)
    both_nan = np.isnan(a) & np.isnan(e)
    err = np.where(both_nan, 0.0, np.abs(a - e))
    # NaN anywhere else (a NaN in one of the two) is an infinite error.
    err = np.where(np.isnan(err), np.inf, err)
    mag = np.where(both_nan, 0.0, np.abs(e))
    bound = tol.bound(mag)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err == 0, 0.0, err / np.where(bound > 0, bound, 0.0))
        floor = tol.atol / tol.rtol if tol.rtol > 0 else 0.0
        denom = np.maximum(mag, floor)
        rel = np.where(err == 0, 0.0, err / np.where(denom > 0, denom, 1.0))
        rel = np.where(denom > 0, rel, np.where(err == 0, 0.0, np.inf))
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    flat = int(np.argmax(ratio))
    where = tuple(int(i) for i in np.unravel_index(flat, a.shape))
    worst_ratio = float(ratio.flat[flat])
    return Comparison(
        name=name,
        ok=bool(worst_ratio <= 1.0),
        max_abs=float(err.max()),
        max_rel=float(rel.max()),
        ratio=worst_ratio,
        where=where,
        actual_at=float(a[where]),
        expected_at=float(e[where]),
        tol=tol,
    )


def worst(comparisons: Iterable[Comparison]) -> Comparison | None:
    """The comparison with the largest ratio (a failed one first); None when there are none."""
    items = list(comparisons)
    if not items:
        return None
    return max(items, key=lambda c: (not c.ok, c.ratio, c.max_abs))
