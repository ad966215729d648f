"""Install hints: which ``pip install 'memcore[...]'`` extra provides a backend's framework.

Only names memcore ships have an extra; a third-party backend (an entry point or a
``package.module:factory`` path) gets no hint, since its package is not ours to name.
"""

from __future__ import annotations

__all__ = ["EXTRAS", "install_hint"]

# backend name -> the extra in pyproject.toml that installs its framework
EXTRAS = {
    "torch": "torch",
    "jax": "jax",
    "cupy": "cupy",
    "array_api": "array-api",
}


def install_hint(name: str) -> str:
    """``pip install 'memcore[<extra>]'`` for a backend memcore ships, else ""."""
    extra = EXTRAS.get(name)
    return f"pip install 'memcore[{extra}]'" if extra else ""
