"""Reports: the terminal table, the progress bar, and the JSON record.

Terminal table: one row per (op, check) (and per backend pair in a cross table), one
column per dtype; a cell is the status and the largest |actual - expected| over all the
check's examples ("ok 3.2e-07", "FAIL 1.1e-02", "skip", "xfail"), as the legend above the
table says. Failures are listed under the table with that same worst comparison (where,
both values, the tolerance) and the example it came from.

JSON: memcore version and SPEC_VERSION, python / numpy / platform, the backend's name,
version, device, dtypes and numerics settings (TF32, x64, matmul precision), and every
check with every error figure.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from memcore.conformance.result import CheckResult

if TYPE_CHECKING:
    from memcore.conformance.runner import Unit

__all__ = [
    "Progress",
    "backend_record",
    "document",
    "environment",
    "format_table",
    "result_record",
    "summary",
    "write_json",
]

_CELL = {
    "passed": "ok",
    "failed": "FAIL",
    "skipped": "skip",
    "xfailed": "xfail",
    "xpassed": "XPASS",
}


def _figure(r: CheckResult) -> str:
    if r.worst is not None and r.status != "skipped":
        return f"{r.worst.max_abs:.1e}"
    return ""


def format_table(
    results: Sequence[CheckResult], figure: Callable[[CheckResult], str] = _figure
) -> str:
    """The op x check x dtype table plus a list of failures, skips and xfails.

    ``figure`` writes a cell's number(s) after its status (default: the max abs error).
    """
    dtypes = list(dict.fromkeys(r.dtype for r in results))
    pairs = any("~" in r.backend for r in results)
    rows = list(dict.fromkeys((r.backend, r.op, r.check) for r in results))
    by_key = {(r.backend, r.op, r.check, r.dtype): r for r in results}
    head = (["backends"] if pairs else []) + ["op", "check"] + dtypes
    body = []
    for backend, op, check in rows:
        cells = []
        for d in dtypes:
            r = by_key.get((backend, op, check, d))
            cells.append("" if r is None else f"{_CELL[r.status]} {figure(r)}".rstrip())
        body.append(([backend.replace("~", " vs ")] if pairs else []) + [op, check] + cells)
    widths = (
        [max(len(str(x)) for x in col) for col in zip(head, *body)]
        if body
        else [len(h) for h in head]
    )
    legend = "cells: status and max |actual - expected| over all examples (FAIL notes below)"
    if figure is not _figure:
        legend = "cells: status and the figures named in the title"
    lines = [legend, "  ".join(str(c).ljust(w) for c, w in zip(head, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    notes = _notes(results)
    return "\n".join(lines + ([""] + notes if notes else []))


def _notes(results: Sequence[CheckResult]) -> list[str]:
    out = []
    for r in results:
        if r.status == "failed":
            shown = r.worst is not None and not r.worst.ok
            detail = r.worst.describe() if shown else r.reason  # type: ignore[union-attr]
            example = f"\n      example: {r.failed_example}" if r.failed_example else ""
            out.append(f"  FAIL  {r.id}: {detail}{example}")
    skipped = [r for r in results if r.status == "skipped"]
    for reason in dict.fromkeys(r.reason for r in skipped):
        n = sum(r.reason == reason for r in skipped)
        out.append(f"  skip  {n} checks: {reason}")
    for r in results:
        if r.status in ("xfailed", "xpassed"):
            out.append(f"  {r.status:<6}{r.id}: {r.reason}")
    return out


def summary(results: Iterable[CheckResult]) -> dict[str, int]:
    """Counts per status (every status present, zeros included)."""
    counts = dict.fromkeys(_CELL, 0)
    for r in results:
        counts[r.status] += 1
    return counts


def result_record(r: CheckResult) -> dict[str, Any]:
    """One check as JSON: id, status, reason, examples and every error figure."""
    return {
        "id": r.id,
        "backend": r.backend,
        "device": r.device,
        "dtype": r.dtype,
        "op": r.op,
        "check": r.check,
        "status": r.status,
        "reason": r.reason,
        "examples": r.examples,
        "failed_example": r.failed_example,
        "seconds": round(r.seconds, 4),
        "worst": None if r.worst is None else r.worst.to_json(),
    }


def environment() -> dict[str, Any]:
    """memcore / spec / python / numpy / platform versions."""
    import memcore

    return {
        "memcore_version": memcore.__version__,
        "spec_version": memcore.SPEC_VERSION,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def backend_record(
    name: str,
    backend: Any,
    *,
    device: str | None,
    dtypes: Sequence[str],
    numerics: Mapping[str, Any],
    results: Sequence[CheckResult],
    error: str = "",
    profile: str = "",
    xfail_file: str | None = None,
) -> dict[str, Any]:
    """One backend's part of the JSON report (``error`` when it could not run at all)."""
    return {
        "name": name,
        "version": getattr(backend, "version", None),
        "device": device,
        "devices": list(backend.devices()) if backend is not None and not error else [],
        "dtypes": list(dtypes),
        "numerics": dict(numerics),
        "profile": profile,
        "xfail_file": xfail_file,
        "error": error,
        "summary": summary(results),
        "results": [result_record(r) for r in results],
    }


def document(
    backends: Sequence[Mapping[str, Any]],
    *,
    profile: str,
    self_check: Mapping[str, Any] | None = None,
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The whole JSON report: environment, self-check, every backend, and overall ``ok``."""
    failed = any(b["error"] or b["summary"]["failed"] for b in backends)
    if self_check:
        failed = failed or any(not row["ok"] for rows in self_check.values() for row in rows)
    return {
        **environment(),
        "profile": profile,
        "command": list(command) if command is not None else None,
        "self_check": dict(self_check or {}),
        "backends": list(backends),
        "ok": not failed,
    }


def write_json(path: str, doc: Mapping[str, Any]) -> None:
    """Write ``doc`` as indented JSON (NaN and inf are written as strings)."""
    import json
    import math

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if v is None or isinstance(v, (str, int, float, bool)):
            return v
        return str(v)  # e.g. a framework's dtype or device object in numerics settings

    with open(path, "w", encoding="utf-8") as fh:
        json.dump(clean(dict(doc)), fh, indent=1, allow_nan=False)
        fh.write("\n")


class Progress:
    """A progress bar on stderr, drawn in place when stderr is a terminal.

    Not a terminal (CI logs, pipes): nothing is drawn unless ``force`` is set, in which
    case one line is printed per unit.
    """

    def __init__(
        self,
        label: str,
        stream: TextIO | None = None,
        *,
        enabled: bool | None = None,
        width: int = 30,
    ):
        self.label = label
        self.stream = stream or sys.stderr
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = tty if enabled is None else enabled
        self.inplace = tty
        self.width = width

    def __call__(self, done: int, total: int, unit: Unit) -> None:
        if not self.enabled or total == 0:
            return
        filled = self.width * done // total
        bar = "#" * filled + "." * (self.width - filled)
        what = "done" if done == total else f"{unit.dtype} {unit.op}"
        line = f"{self.label} [{bar}] {done}/{total} {what}"
        if self.inplace:
            self.stream.write("\r\x1b[2K" + line + ("\n" if done == total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
