"""Shared test setup: float64 for JAX, and the hypothesis profile.

Set before anything can import jax: JAX reads ``JAX_ENABLE_X64`` once, when it is first
imported, and without it every float64 array silently becomes float32, which would make
the JAX backend's float64 conformance and finite-difference comparisons meaningless.
``setdefault`` keeps an explicit choice from the environment.
"""

import os

os.environ.setdefault("JAX_ENABLE_X64", "1")

from memcore.conformance.profiles import load_profile  # after the env var on purpose

# MEMCORE_HYPOTHESIS_PROFILE picks dev (default), ci (derandomized) or nightly.
load_profile()
