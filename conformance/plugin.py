"""pytest plugin of the conformance suite (registered as the ``pytest11`` entry point).

It is loaded by every pytest run, so at import it only declares options: no backend,
no framework, no tests. Tests exist only when the suite is collected explicitly::

    pytest --pyargs memcore.conformance --memcore-backend torch --memcore-dtype float32
"""

from __future__ import annotations

from typing import Any

__all__ = ["pytest_addoption"]


def pytest_addoption(parser: Any) -> None:
    """The ``--memcore-*`` options (read by ``memcore/conformance/test_conformance.py``)."""
    group = parser.getgroup("memcore", "memcore conformance suite")
    group.addoption("--memcore-backend", default=None,
                    help="backend to test: a registered name or 'pkg.mod:factory' (default numpy)")
    group.addoption("--memcore-dtype", default=None,
                    help="comma-separated dtypes (default: those the backend supports among float64,float32)")
    group.addoption("--memcore-device", default=None, help="device, e.g. cpu or cuda:0 (default cpu)")
    group.addoption("--memcore-xfails", default=None,
                    help="xfail file: one id pattern per line with '# reason' (default: the bundled file)")
    group.addoption("--memcore-json", default=None, help="write the JSON report here")
    group.addoption("--memcore-profile", default=None,
                    help="dev, ci or nightly (default $MEMCORE_HYPOTHESIS_PROFILE, else dev)")
