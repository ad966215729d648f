"""Lazy backend registry: names map to import paths, imported on first use.

Choice of backend, first match wins:
  1. the explicit ``name`` argument of :func:`get_backend`;
  2. the innermost ``with memcore.use_backend(name):`` block;
  3. the ``MEMCORE_BACKEND`` environment variable;
  4. ``backend = "..."`` in ``memcore.toml`` in the working directory, else
     ``[tool.memcore] backend = "..."`` in ``pyproject.toml`` there;
  5. ``"numpy"``, the reference.

Where names come from: the ``memcore.backends`` entry-point group (name ->
``"module:factory"``), which our own backends use too (pyproject.toml), and
:data:`_BUILTIN`, the same table for a source checkout that is not installed. An entry
point takes precedence over a built-in of the same name: identical targets (ours) keep the
built-in's framework requirement; a different target replaces the built-in. Entry points
are read from package metadata, so listing or describing backends imports none of them.

Nothing here imports torch, jax, cupy or array_api_strict; several backends live in one process.
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
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import tomllib

from memcore.errors import MemcoreError
from memcore.extras import install_hint

__all__ = [
    "BackendEntry",
    "BackendInfo",
    "available_backends",
    "describe_backends",
    "format_backends",
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
        requires: top-level modules that must be importable (checked without importing);
            the first one is the framework whose version :func:`describe_backends` reports.
        source: "built-in" or "entry point (<distribution>)".
    """

    name: str
    target: str
    requires: tuple[str, ...] = ()
    source: str = "built-in"

    def importable(self) -> bool:
        """True when every required module can be found (find_spec does not import it)."""
        return all(importlib.util.find_spec(m) is not None for m in self.requires)


_BUILTIN = (
    BackendEntry("numpy", "memcore.backends.numpy:NumpyBackend", ("numpy",)),
    BackendEntry("torch", "memcore.backends.torch:TorchBackend", ("torch",)),
    BackendEntry("jax", "memcore.backends.jax:JaxBackend", ("jax",)),
    BackendEntry("cupy", "memcore.backends.cupy:CupyBackend", ("cupy",)),
    BackendEntry("array_api", "memcore.backends.array_api:default_backend", ("array_api_strict",)),
)

_context: contextvars.ContextVar[str | None] = contextvars.ContextVar("memcore_backend", default=None)
_instances: dict[str, Any] = {}
_lock = threading.Lock()


def registered_backends() -> dict[str, BackendEntry]:
    """Every backend memcore knows by name: ``memcore.backends`` entry points, then the
    built-in table for names no entry point provides (see the module docstring)."""
    builtin = {e.name: e for e in _BUILTIN}
    entries = dict(builtin)
    claimed: set[str] = set()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in claimed:
            continue  # two distributions claim one name: the first found keeps it
        claimed.add(ep.name)
        dist = getattr(getattr(ep, "dist", None), "name", None) or "unknown distribution"
        source = f"entry point ({dist})"
        known = builtin.get(ep.name)
        if known is not None and known.target == ep.value:
            entries[ep.name] = attrs.evolve(known, source=source)
        else:
            top = ep.value.split(":")[0].split(".")[0]
            entries[ep.name] = BackendEntry(ep.name, ep.value, (top,), source)
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
        if not isinstance(name, str) or not name:
            raise MemcoreError(
                f"`name` must be a backend name (a non-empty str) or 'package.module:factory'. "
                f"Received: name={name!r} ({type(name).__name__}). "
                f"Available: {', '.join(available_backends())}"
            )
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
        hint = install_hint(label)
        todo = f"install its extra: {hint}" if hint else "is its package installed?"
        raise MemcoreError(
            f"Backend {label!r} could not be imported ({module_name}): {exc}; {todo}"
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
                f"Backend {chosen!r} needs {', '.join(missing)}, which is not installed "
                f"({install_hint(chosen) or 'install the package that provides it'}). "
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


# ------------------------------------------------------------------ describing backends
@attrs.frozen
class BackendInfo:
    """One row of ``memcore backends``.

    Attributes:
        name: the registry name.
        target: "module:factory".
        source: "built-in" or "entry point (<distribution>)".
        available: every required module is importable (found, not imported).
        version: the framework's installed version from package metadata, or None.
        devices: the backend's device names when it is loaded (or ``load=True``), else None.
        error: why loading failed (``load=True`` only), else "".
    """

    name: str
    target: str
    source: str
    available: bool
    version: str | None
    devices: tuple[str, ...] | None = None
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        """The row as plain data (devices as a list, or None)."""
        out = attrs.asdict(self)
        out["devices"] = None if self.devices is None else list(self.devices)
        return out


def _framework_version(entry: BackendEntry, owners: Mapping[str, list[str]]) -> str | None:
    """The installed version of the distribution providing ``entry.requires[0]``."""
    if not entry.requires:
        return None
    for dist in owners.get(entry.requires[0], []) or [entry.requires[0]]:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def describe_backends(load: bool = False) -> list[BackendInfo]:
    """Every registered backend, sorted by name, for ``memcore backends``.

    Nothing is imported unless ``load`` is True: availability comes from ``find_spec``
    and versions from package metadata. Devices are listed for backends already loaded
    in this process, and, with ``load=True``, for every available backend (loading it;
    a backend that fails to load reports the error instead).
    """
    from memcore.protocol import list_devices

    owners = importlib.metadata.packages_distributions()
    rows = []
    for name, entry in sorted(registered_backends().items()):
        available = entry.importable()
        devices, error = None, ""
        with _lock:
            instance = _instances.get(name)
        if instance is None and load and available:
            try:
                instance = get_backend(name)
            except Exception as exc:  # noqa: BLE001 - a broken backend is reported, not raised
                error = f"{type(exc).__name__}: {exc}"
        if instance is not None:
            try:
                devices = list_devices(instance)
            except Exception as exc:  # noqa: BLE001
                error = f"devices() failed: {type(exc).__name__}: {exc}"
        version = _framework_version(entry, owners) if available else None
        rows.append(
            BackendInfo(name, entry.target, entry.source, available, version, devices, error)
        )
    return rows


def format_backends(rows: list[BackendInfo]) -> str:
    """``describe_backends()`` as an aligned text table (one line per backend)."""
    head = ("name", "status", "version", "devices", "target", "source")
    body = []
    for r in rows:
        if r.error:
            devices = f"error: {r.error}"
        elif r.devices is None:
            devices = "(not loaded)" if r.available else "-"
        else:
            devices = ", ".join(r.devices)
        status = "available" if r.available else "not installed"
        body.append((r.name, status, r.version or "-", devices, r.target, r.source))
    widths = [max(len(row[i]) for row in (head, *body)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in (head, *body)]
    return "\n".join(lines)
