"""docs/porting.md stays true: its op table is the registry's, and the protocol names,
check names and files it cites exist."""

from __future__ import annotations

import pathlib
import re

import memcore.protocol
from memcore.conformance.checks import OP_CHECKS
from memcore.conformance.routing_checks import ROUTING_CHECKS
from memcore.ops import OPS
from memcore.opspec import Tensor

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "porting.md").read_text()


def _attr(a) -> str:
    if isinstance(a, Tensor):
        return f"`{a.name}` ({', '.join(a.shape)}) {a.kind}" + (" or None" if a.optional else "")
    if a.required:
        return f"`{a.name}` ({'/'.join(t.__name__ for t in a.types)}, required)"
    return f"`{a.name}` = {a.default!r}"


def ops_table() -> str:
    """The markdown table of every op in memcore.OPS, as docs/porting.md shows it."""
    rows = ["| op | inputs | attributes | outputs |", "|---|---|---|---|"]
    for name, spec in OPS.items():
        ins = ", ".join(
            f"`{t.name}` ({', '.join(t.shape)})" + ("" if t.differentiable else " no grad")
            for t in spec.inputs
        )
        ats = ", ".join(_attr(a) for a in spec.attributes) or "-"
        outs = ", ".join(f"`{o}` ({', '.join(shape)})" for o, shape in spec.outputs)
        rows.append(f"| `{name}` | {ins} | {ats} | {outs} |")
    return "\n".join(rows)


def test_ops_table_matches_the_registry():
    """The table between the ops-table markers is exactly what the registry generates."""
    found = re.search(r"<!-- ops-table -->\n(.*?)\n<!-- /ops-table -->", DOC, re.DOTALL)
    assert found, "docs/porting.md lost its <!-- ops-table --> markers"
    assert found.group(1).strip() == ops_table(), "regenerate the table with ops_table()"


def test_cited_protocol_helpers_and_checks_exist():
    """Every memcore.protocol helper and every check name the doc cites is real."""
    for helper in re.findall(r"memcore\.protocol\.(\w+)", DOC):
        assert hasattr(memcore.protocol, helper), helper
    checks = set(OP_CHECKS) | {c for cs in ROUTING_CHECKS.values() for c in cs}
    table = DOC.split("## 5. What the suite checks", 1)[1].split("### 5.1", 1)[0]
    cited = {
        c
        for cell in re.findall(r"^\| (`[^|]+`) \|", table, re.MULTILINE)
        for c in re.findall(r"`(\w+)`", cell)
    }
    assert cited == checks


def test_cited_files_exist():
    """Paths the doc points porters to exist in the repository."""
    for path in (
        "examples/template_backend/pyproject.toml",
        "backends/array_api/backend.py",
        "conformance/tolerances.py",
        "conformance/xfails.py",
        "conformance/hooks.py",
        "docs/semantics.md",
        "tests/test_template_backend.py",
    ):
        assert (ROOT / path).is_file(), path
