"""Hypothesis profiles shared by the project's tests and the conformance suite.

``dev`` is fast; ``ci`` is derandomized with no deadline and no example database;
``nightly`` draws 1000 examples. Chosen by ``MEMCORE_HYPOTHESIS_PROFILE`` (default dev).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

__all__ = ["PROFILES", "load_profile", "profile_name", "register_profiles"]

PROFILES = ("dev", "ci", "nightly")
_registered = False


def register_profiles() -> None:
    """Register the three profiles with hypothesis (idempotent)."""
    global _registered
    if _registered:
        return
    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("dev", max_examples=15, **common)
    settings.register_profile("ci", max_examples=30, derandomize=True, database=None, print_blob=True, **common)
    settings.register_profile("nightly", max_examples=1000, **common)
    _registered = True


def profile_name(name: str | None = None) -> str:
    """Profile ``name`` (or ``$MEMCORE_HYPOTHESIS_PROFILE``, default "dev"), validated, registered,
    but not loaded: the conformance runner passes it explicitly instead of changing the
    process-wide hypothesis profile."""
    from memcore.errors import MemcoreError

    register_profiles()
    chosen = name or os.environ.get("MEMCORE_HYPOTHESIS_PROFILE", "dev")
    if chosen not in PROFILES:
        raise MemcoreError(f"`profile` must be one of {', '.join(PROFILES)}. Received: profile={chosen!r}")
    return chosen


def load_profile(name: str | None = None) -> str:
    """Load profile ``name`` (or ``$MEMCORE_HYPOTHESIS_PROFILE``, default "dev"); return its name."""
    from memcore.errors import MemcoreError

    register_profiles()
    chosen = name or os.environ.get("MEMCORE_HYPOTHESIS_PROFILE", "dev")
    if chosen not in PROFILES:
        raise MemcoreError(f"`profile` must be one of {', '.join(PROFILES)}. Received: profile={chosen!r}")
    settings.load_profile(chosen)
    return chosen
