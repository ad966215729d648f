"""pytest plugin of the conformance suite (registered as the ``pytest11`` entry point).

It is loaded by every pytest run, so at import it only declares options: no backend,
no framework, no tests. Tests exist only when the suite's own module is collected::

    pytest --pyargs memcore.conformance --memcore-backend torch --memcore-dtype float32

Each test is one check, with the id ``<backend>-<device>-<dtype>-<op>-<check>`` that xfail
files match. A unit's checks run together on first use and are cached for the session.
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = [
    "ConformanceSession",
    "get_session",
    "pytest_addoption",
    "pytest_report_header",
    "pytest_sessionfinish",
    "pytest_terminal_summary",
]

_KEY = "_memcore_conformance_session"


def pytest_addoption(parser: Any) -> None:
    """The ``--memcore-*`` options (read by ``memcore/conformance/test_conformance.py``)."""
    group = parser.getgroup("memcore", "memcore conformance suite")
    group.addoption(
        "--memcore-backend",
        default=None,
        help="backend to test: a registered name or 'pkg.mod:factory' (default: as memcore "
        "verify, MEMCORE_BACKEND, then ./memcore.toml, then numpy)",
    )
    group.addoption(
        "--memcore-dtype",
        default=None,
        help="comma-separated dtypes (default: float64,float32; unsupported ones are skipped with the reason)",
    )
    group.addoption(
        "--memcore-device", default=None, help="device, e.g. cpu or cuda:0 (default cpu)"
    )
    group.addoption(
        "--memcore-xfails",
        default=None,
        help="xfail file: one id pattern per line with '# reason' (default: the bundled file)",
    )
    group.addoption("--memcore-json", default=None, help="write the JSON report here")
    group.addoption(
        "--memcore-profile",
        default=None,
        help="dev, ci or nightly (default $MEMCORE_HYPOTHESIS_PROFILE, else ci, as in verify)",
    )
    group.addoption(
        "--memcore-no-routing",
        action="store_true",
        default=False,
        help="leave out the routing equivalences",
    )


def pytest_report_header(config: Any) -> list[str]:
    """Echo the memcore options and MEMCORE_* variables (only when an option is set)."""
    opts = {
        k: config.getoption(k)
        for k in ("memcore_backend", "memcore_dtype", "memcore_device", "memcore_profile")
    }
    if not any(opts.values()):
        return []
    env = {k: v for k, v in os.environ.items() if k.startswith(("MEMCORE_", "JAX_ENABLE_X64"))}
    return [f"memcore conformance: {opts}", f"environment: {env}"]


class ConformanceSession:
    """Backend, device, dtypes, xfails and cached unit results for one pytest session."""

    def __init__(self, config: Any) -> None:
        import pytest

        from memcore.conformance.runner import CHECK_DTYPES, pin_numerics, plan, resolve_device
        from memcore.conformance.xfails import backend_xfail_file, load_xfails
        from memcore.errors import MemcoreError
        from memcore.registry import get_backend, resolve_backend_name

        opt = config.getoption
        dtypes = [d.strip() for d in (opt("memcore_dtype") or "").split(",") if d.strip()] or None
        if "jax" not in sys.modules and (dtypes is None or "float64" in dtypes):
            # JAX reads this once, at first import; without it float64 silently becomes float32.
            os.environ.setdefault("JAX_ENABLE_X64", "1")
        try:
            from memcore.conformance.profiles import profile_name

            self.name = opt("memcore_backend") or resolve_backend_name()
            profile = opt("memcore_profile") or os.environ.get("MEMCORE_HYPOTHESIS_PROFILE")
            self.profile = profile_name(profile or "ci")
            self.backend = get_backend(self.name)
            self.device = resolve_device(self.backend, opt("memcore_device"))
            for d in dtypes or ():
                if d not in CHECK_DTYPES:
                    raise MemcoreError(
                        f"`--memcore-dtype` must be among {', '.join(CHECK_DTYPES)}. Received: {d!r}"
                    )
            self.xfail_file = opt("memcore_xfails") or backend_xfail_file(self.backend)
            self.xfails = load_xfails(self.xfail_file)
        except MemcoreError as exc:
            raise pytest.UsageError(str(exc)) from None
        # float64 and float32 by default: a device without float64 reports skips, with the reason.
        self.dtypes = dtypes or ["float64", "float32"]
        self.numerics = pin_numerics(self.backend)
        if self.backend.name == "jax":
            from memcore.conformance.jax_cache import enable_jax_compile_cache

            enable_jax_compile_cache()
        self.units = plan(None, self.dtypes, not opt("memcore_no_routing"))
        self.json_path = opt("memcore_json")
        self._results: dict[Any, dict[str, Any]] = {}

    def cases(self) -> list[tuple[Any, str]]:
        """(unit, check) pairs, in plan order."""
        return [(u, c) for u in self.units for c in u.checks]

    def case_id(self, case: tuple[Any, str]) -> str:
        from memcore.conformance.runner import check_id

        unit, check = case
        return check_id(self.backend.name, self.device, unit.dtype, unit.op, check)

    def result(self, case: tuple[Any, str]) -> Any:
        """The CheckResult of one case (its unit runs on first use)."""
        from memcore.conformance.runner import dtype_skip_reason, unit_results

        unit, check = case
        if unit not in self._results:
            results = unit_results(
                self.backend,
                unit,
                device=self.device,
                profile=self.profile,
                xfails=self.xfails,
                skip_reason=dtype_skip_reason(self.backend, self.device, unit.dtype),
            )
            self._results[unit] = {r.check: r for r in results}
        return self._results[unit][check]

    def write_json(self) -> None:
        from memcore.conformance import report

        results = [r for by_check in self._results.values() for r in by_check.values()]
        record = report.backend_record(
            self.name,
            self.backend,
            device=self.device,
            dtypes=self.dtypes,
            numerics=self.numerics,
            results=results,
            profile=self.profile,
            xfail_file=None if self.xfail_file is None else str(self.xfail_file),
        )
        report.write_json(
            self.json_path, report.document([record], profile=self.profile, command=sys.argv)
        )


def get_session(config: Any) -> ConformanceSession:
    """The session's ConformanceSession, created on first use (by the suite's test module)."""
    session = getattr(config, _KEY, None)
    if session is None:
        session = ConformanceSession(config)
        setattr(config, _KEY, session)
    return session


def pytest_terminal_summary(terminalreporter: Any, exitstatus: Any, config: Any) -> None:
    """Warn about xfail patterns that match no generated check id (stale entries)."""
    conf = getattr(config, _KEY, None)
    if conf is None:
        return
    ids = [conf.case_id(c) for c in conf.cases()]
    for entry in conf.xfails.entries:
        if not any(entry.pattern in i for i in ids):
            terminalreporter.write_line(
                f"memcore: xfail pattern {entry.pattern!r} ({entry.source}) matches no check",
                yellow=True,
            )


def pytest_sessionfinish(session: Any, exitstatus: Any) -> None:
    """Write ``--memcore-json`` when the suite ran in this session."""
    conf = getattr(session.config, _KEY, None)
    if conf is not None and conf.json_path:
        conf.write_json()
