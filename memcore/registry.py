"""Lazy backend registry: names map to import paths, imported on first use.

Choice of backend, first match wins:
  1. the explicit ``name`` argument of :func:`get_backend`;
  2. the innermost ``with memcore.use_backend(name):`` block;
  3. the ``MEMCORE_BACKEND`` environment variable;
  4. ``backend = "..."`` in ``memcore.toml`` in the working directory, else
     ``[tool.memcore] backend = "..."`` in ``pyproject.toml`` there;
  5. ``"numpy"``, the reference.

Nothing here imports torch, jax or cupy; several backends live in one process.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.metadata
import importlib.util
import os
import pathlib
import threading
import tomllib
from collections.abc import Iterator
from typing import Any

import attrs

from memcore.errors import MemcoreError

__all__ = [
    "BackendEntry",
    "available_backends",
    "get_backend",
    "registered_backends",
    "resolve_backend_name",
    "use_backend",
]

ENTRY_POINT_GROUP = "memcore.backends"
DEFAULT_BACKEND = "numpy"


@attrs.frozen
class BackendEntry:
    """A backend known by name, not yet imported.

    Attributes:
        name: the registry name, e.g. "torch".
        target: "module:factory", imported on first use.
        requires: top-level modules that must be importable (checked without importing).
    """

    name: str
    target: str
    requires: tuple[str, ...] = ()

    def importable(self) -> bool:
        """True when every required module can be found (find_spec does not import it)."""
        return all(importlib.util.find_spec(m) is not None for m in self.requires)


_BUILTIN = (
    BackendEntry("numpy", "memcore.backends.numpy:NumpyBackend", ("numpy",)),
    BackendEntry("torch", "memcore.backends.torch:TorchBackend", ("torch",)),
    BackendEntry("jax", "memcore.backends.jax:JaxBackend", ("jax",)),
    BackendEntry("cupy", "memcore.backends.cupy:CupyBackend", ("cupy",)),
)

_context: contextvars.ContextVar[str | None] = contextvars.ContextVar("memcore_backend", default=None)
_instances: dict[str, Any] = {}
_lock = threading.Lock()


def registered_backends() -> dict[str, BackendEntry]:
    """Every backend memcore knows by name: built-ins plus ``memcore.backends`` entry points."""
    entries = {e.name: e for e in _BUILTIN}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in entries:
            top = ep.value.split(":")[0].split(".")[0]
            entries[ep.name] = BackendEntry(ep.name, ep.value, (top,))
    return entries


def available_backends() -> list[str]:
    """Sorted names of registered backends whose framework is installed (nothing is imported)."""
    return sorted(n for n, e in registered_backends().items() if e.importable())


def _config_file_backend(cwd: pathlib.Path) -> str | None:
    own = cwd / "memcore.toml"
    if own.is_file():
        value = _config_value(_read_toml(own).get("backend"), own)
        # First match wins: a memcore.toml without a backend key defers to pyproject.toml.
        if value is not None:
            return value
    project = cwd / "pyproject.toml"
    if project.is_file():
        data = _read_toml(project)
        value = data.get("tool", {}).get("memcore", {}).get("backend")
        return _config_value(value, project)
    return None


def _read_toml(path: pathlib.Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise MemcoreError(f"`{path}` must be valid TOML. Received: {exc}") from None


def _config_value(value: Any, path: pathlib.Path) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise MemcoreError(
            f"`backend` in {path} must be a non-empty string. Received: backend={value!r}"
        )
    return value


def resolve_backend_name(name: str | None = None) -> str:
    """The backend name the precedence rules select (see the module docstring)."""
    if name is not None:
        return name
    ctx = _context.get()
    if ctx is not None:
        return ctx
    env = os.environ.get("MEMCORE_BACKEND")
    if env:
        return env
    from_file = _config_file_backend(pathlib.Path.cwd())
    if from_file is not None:
        return from_file
    return DEFAULT_BACKEND


def _load(target: str, label: str) -> Any:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise MemcoreError(
            f"`backend` must be a registered name or 'package.module:factory'. Received: {label!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MemcoreError(
            f"Backend {label!r} could not be imported ({module_name}): {exc}. "
            f"Install its extra, e.g. pip install 'memcore[{label}]'"
        ) from None
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise MemcoreError(
            f"`backend` factory {attr!r} must exist in module {module_name!r}. "
            f"Received: {target!r}"
        ) from None
    return factory()


def get_backend(name: str | None = None) -> Any:
    """Return the backend instance for ``name`` (or the one the precedence rules select).

    Args:
        name: a registered name ("numpy", "torch", "jax", "cupy", or an entry point),
            or a "package.module:factory" path for an unregistered third-party backend.

    Raises:
        MemcoreError: unknown name (the message lists the available ones), or the
            backend's framework is not installed.
    """
    chosen = resolve_backend_name(name)
    with _lock:
        if chosen in _instances:
            return _instances[chosen]
    entries = registered_backends()
    if chosen in entries:
        entry = entries[chosen]
        if not entry.importable():
            missing = [m for m in entry.requires if importlib.util.find_spec(m) is None]
            raise MemcoreError(
                f"Backend {chosen!r} needs {', '.join(missing)}, which is not installed. "
                f"Available: {', '.join(available_backends())}"
            )
        instance = _load(entry.target, chosen)
    elif ":" in chosen:
        instance = _load(chosen, chosen)
    else:
        raise MemcoreError(
            f"Unknown backend {chosen!r}. Available: {', '.join(available_backends())}"
        )
    with _lock:
        return _instances.setdefault(chosen, instance)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[Any]:
    """Select a backend inside a ``with`` block; nests, and is local to the context/thread.

    The name is checked on entry, so a typo fails at the ``with`` line.
    """
    backend = get_backend(name)
    token = _context.set(name)
    try:
        yield backend
    finally:
        _context.reset(token)
