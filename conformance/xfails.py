"""Known deviations of a backend: xfail files, one id pattern per line with its reason.

Format (``conformance/xfails/<backend>.txt``)::

    # comments and blank lines are ignored
    cuda:0-bfloat16-sparse_retrieve-vjp   # ties in bfloat16 scores change the top-k set

A pattern matches every check id that contains it (substring). Check ids read
``<backend>-<device>-<dtype>-<op>-<check>``, e.g. ``torch-cpu-float32-sparsify-vjp`` or
``torch-cpu-float64-memformer-mrbp_vs_ref_bptt``. A failing check that matches is reported
``xfailed``; a passing one ``xpassed`` (not an error: the entry may be stale). Patterns that
match no check are warned about.

Which file applies to a backend (:func:`backend_xfail_file`): ``--xfails`` when given, else
the file the backend declares in its ``xfail_file`` attribute (how a third-party backend
ships its own known deviations next to its code), else the bundled
``conformance/xfails/<backend>.txt``. Files are UTF-8.
"""

from __future__ import annotations

import pathlib
import warnings
from collections.abc import Iterable
from typing import Any

import attrs

from memcore.errors import MemcoreError

__all__ = [
    "XFAIL_DIR",
    "Xfail",
    "XfailList",
    "backend_xfail_file",
    "bundled_xfail_file",
    "load_xfails",
    "parse_xfails",
]

XFAIL_DIR = pathlib.Path(__file__).parent / "xfails"


@attrs.frozen
class Xfail:
    """One entry: the id substring, its reason, and where it was written."""

    pattern: str
    reason: str
    source: str = ""


@attrs.define
class XfailList:
    """Entries plus the set of patterns that matched at least one id."""

    entries: tuple[Xfail, ...] = ()
    used: set[str] = attrs.field(factory=set)

    def match(self, check_id: str) -> Xfail | None:
        """The first entry whose pattern is a substring of ``check_id`` (marked as used)."""
        for e in self.entries:
            if e.pattern in check_id:
                self.used.add(e.pattern)
                return e
        return None

    def unmatched(self) -> list[Xfail]:
        """Entries whose pattern matched nothing so far."""
        return [e for e in self.entries if e.pattern not in self.used]

    def warn_unmatched(self) -> list[Xfail]:
        """Warn (``UserWarning``) about each unmatched entry; return them."""
        stale = self.unmatched()
        for e in stale:
            warnings.warn(
                f"xfail pattern {e.pattern!r} ({e.source}) matched no check",
                UserWarning,
                stacklevel=2,
            )
        return stale


def parse_xfails(lines: Iterable[str], source: str = "<xfails>") -> XfailList:
    """Parse xfail lines: ``pattern  # reason``; every pattern needs a reason.

    Raises:
        MemcoreError: a pattern without a ``# reason``, or a pattern with spaces in it.
    """
    entries = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pattern, sep, reason = line.partition("#")
        pattern, reason = pattern.strip(), reason.strip()
        where = f"{source}:{number}"
        if not sep or not reason:
            raise MemcoreError(
                f"Each xfail line must be 'pattern  # reason'. Received at {where}: {raw.rstrip()!r}"
            )
        if any(ch.isspace() for ch in pattern):
            raise MemcoreError(
                f"An xfail pattern must be one id substring without spaces. Received at {where}: {pattern!r}"
            )
        entries.append(Xfail(pattern, reason, where))
    return XfailList(tuple(entries))


def bundled_xfail_file(backend_name: str) -> pathlib.Path | None:
    """``conformance/xfails/<backend_name>.txt`` when it exists."""
    path = XFAIL_DIR / f"{backend_name}.txt"
    return path if path.is_file() else None


def backend_xfail_file(backend: Any) -> pathlib.Path | None:
    """The xfail file of ``backend``: its declared ``xfail_file``, else the bundled one.

    Raises:
        MemcoreError: the declared ``xfail_file`` is not a path to an existing file.
    """
    declared = getattr(backend, "xfail_file", None)
    if declared is not None:
        if not isinstance(declared, (str, pathlib.Path)) or not pathlib.Path(declared).is_file():
            raise MemcoreError(
                f"`xfail_file` of backend {getattr(backend, 'name', backend)!r} must be the path "
                f"of an existing file. Received: {declared!r}"
            )
        return pathlib.Path(declared)
    return bundled_xfail_file(getattr(backend, "name", ""))


def load_xfails(path: str | pathlib.Path | None) -> XfailList:
    """Read an xfail file (None gives an empty list).

    Raises:
        MemcoreError: the file does not exist, is not UTF-8 text, or a line is malformed.
    """
    if path is None:
        return XfailList()
    p = pathlib.Path(path)
    if not p.is_file():
        raise MemcoreError(f"`xfails` must be an existing file. Received: {str(p)!r}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MemcoreError(
            f"`xfails` must be a UTF-8 text file. Received: {str(p)!r} with byte "
            f"{exc.object[exc.start:exc.start + 1]!r} at offset {exc.start}"
        ) from None
    except OSError as exc:
        raise MemcoreError(
            f"`xfails` must be a readable file. Received: {str(p)!r} ({exc.strerror})"
        ) from None
    return parse_xfails(text.splitlines(), str(p))
