"""The conformance suite as pytest tests, one per check of the op registry and routing.

Run it against any backend::

    pytest --pyargs memcore.conformance --memcore-backend torch [--memcore-dtype float64,float32]
        [--memcore-device cuda:0] [--memcore-xfails FILE] [--memcore-json report.json]

Options are declared by :mod:`memcore.conformance.plugin`.
"""

from __future__ import annotations

from typing import Any

import pytest

from memcore.conformance.plugin import get_session


def pytest_generate_tests(metafunc: Any) -> None:
    """One test per (op or routing step, dtype, check) of the plan."""
    if "conformance_case" in metafunc.fixturenames:
        session = get_session(metafunc.config)
        cases = session.cases()
        metafunc.parametrize("conformance_case", cases, ids=[session.case_id(c) for c in cases])


def test_conformance(conformance_case: Any, request: Any) -> None:
    """The backend passes this check against the reference (or is skipped for a stated reason)."""
    session = get_session(request.config)
    result = session.result(conformance_case)
    if result.status == "skipped":
        pytest.skip(result.reason)
    if result.status in ("xfailed", "xpassed"):
        request.node.add_marker(pytest.mark.xfail(reason=result.reason, strict=False))
    if result.status in ("failed", "xfailed"):
        detail = result.reason or (result.worst.describe() if result.worst else "")
        example = f"\nexample: {result.failed_example}" if result.failed_example else ""
        pytest.fail(f"{result.id} ({result.examples} examples): {detail}{example}", pytrace=False)
