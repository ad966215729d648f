"""One check's result, the unit of every report (kept free of hypothesis so that
:func:`memcore.check_mrbp` can build the same rows without the conformance extra).
"""

from __future__ import annotations

import attrs

from memcore.conformance.compare import Comparison

__all__ = ["CheckResult"]


@attrs.frozen
class CheckResult:
    """One row-cell of the report: a check of one op (or routing step) at one dtype.

    Attributes:
        id: ``<backend>-<device>-<dtype>-<op>-<check>`` (what xfail patterns match).
        status: "passed", "failed", "skipped", "xfailed" or "xpassed".
        reason: why it failed, was skipped or xfailed; a note when it passed.
        examples: drawn examples it ran on.
        worst: the worst comparison over all examples (None for checks without values).
        failed_example: the first failing example, as a reproducible label.
        seconds: time spent on its unit, shared by the unit's checks.
    """

    id: str
    backend: str
    device: str
    dtype: str
    op: str
    check: str
    status: str
    reason: str = ""
    examples: int = 0
    worst: Comparison | None = None
    failed_example: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status == "failed"
