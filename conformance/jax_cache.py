"""JAX's persistent compilation cache for ``memcore verify`` and the conformance plugin.

Most of a JAX verify run is XLA compiling one program per op and shape. With the cache
on, a second run (or a CI job that keeps the folder) loads them from disk instead. The
folder is ``$MEMCORE_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/memcore/jax``, else
``~/.cache/memcore/jax``; ``MEMCORE_JAX_CACHE_DIR=off`` leaves JAX's settings alone.
A cache directory the user already set in JAX (``jax_compilation_cache_dir``) is kept.
"""

from __future__ import annotations

import os
import pathlib
import sys

__all__ = ["enable_jax_compile_cache", "jax_cache_dir"]


def jax_cache_dir() -> pathlib.Path | None:
    """The cache folder from the environment (None when turned off)."""
    chosen = os.environ.get("MEMCORE_JAX_CACHE_DIR")
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off", "0", "none") else pathlib.Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(base) / "memcore" / "jax"


def enable_jax_compile_cache() -> pathlib.Path | None:
    """Point JAX's persistent compilation cache at :func:`jax_cache_dir` (JAX imported only
    when it already is); returns the folder in use, or None."""
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        return pathlib.Path(current)
    path = jax_cache_dir()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without the cache rather than fail the run
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Our programs are small: cache every one, however fast it compiled.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
