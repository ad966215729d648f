"""An Array API namespace behind the backend protocol, running the reference unchanged.

The reference is written against an array namespace ``xp`` (``memcore.reference._xp``):
every array op it calls is in the Array API standard, new arrays are created on the
device of their inputs, and indexing always names every axis. So the same hand-written
forward and backward, and the same routing drivers, run on the namespace's own arrays.
"""

from __future__ import annotations

import re
from types import ModuleType
from typing import Any

import numpy as np

from memcore import reference
from memcore.errors import MemcoreError
from memcore.ops import OPS
from memcore.protocol import (
    BackendBase,
    Capabilities,
    check_dtype_arg,
    check_to_numpy_arg,
    probe_float64,
)
from memcore.reference._xp import all_finite
from memcore.routing_delegate import RoutingDelegate

__all__ = ["REQUIRED_FUNCTIONS", "ArrayApiBackend", "default_backend", "device_name"]

# What the reference calls on ``xp`` (either spelling of permute/concat is enough).
REQUIRED_FUNCTIONS = (
    "abs", "all", "any", "arange", "asarray", "exp", "isfinite", "log", "matmul",
    "max", "maximum", "mean", "ones", "ones_like", "reshape", "sort", "sqrt", "stack", "sum",
    "tanh", "where", "zeros", "zeros_like",
)  # fmt: skip
_EITHER = (("permute_dims", "transpose"), ("concat", "concatenate"))
_CONVERSION_ERRORS = (BufferError, RuntimeError, TypeError, ValueError)


def device_name(device: Any) -> str:
    """A device object's name: "cpu" for NumPy, "device1" for array_api_strict's
    ``Device('device1')`` (the quoted name inside a ``Device('...')`` repr, else ``str``)."""
    text = str(device)
    found = re.search(r"\(['\"]([^'\"]+)['\"]\)$", text)
    return found.group(1) if found else text


def _namespace_devices(xp: ModuleType) -> tuple[list[Any], Any]:
    """(every device the namespace lists, its default device), from the inspection API."""
    info_fn = getattr(xp, "__array_namespace_info__", None)
    if info_fn is not None:
        info = info_fn()
        default = info.default_device() if hasattr(info, "default_device") else None
        listed = list(info.devices()) if hasattr(info, "devices") else []
        if default is not None and all(d != default for d in listed):
            listed.insert(0, default)
        if listed:
            return listed, default if default is not None else listed[0]
    # Before the 2023.12 inspection API: the device a fresh array lands on.
    only = getattr(xp.asarray(0.0), "device", "cpu")
    return [only], only


class ArrayApiBackend(RoutingDelegate, BackendBase):
    """Any Array API namespace, with gradients from the reference's hand-written backward.

    The routing drivers (``bptt``, ``mrbp``, ``sab_bptt``, ``sab_sparse_replay``) are the
    reference's, inherited from :class:`~memcore.routing_delegate.RoutingDelegate`:
    they are written against the array namespace, so they run on this backend's arrays.

    Args:
        xp: the namespace, e.g. ``array_api_strict`` (or NumPy >= 2, CuPy, ...).
        device: the default device for ``from_numpy`` when none is given, by name
            (see :meth:`devices`) or as the namespace's device object (default: the
            namespace's default device).
        name: the backend name used in reports and check ids.

    Raises:
        MemcoreError: ``xp`` lacks a function the reference calls, or ``device`` is unknown.
    """

    def __init__(self, xp: ModuleType, device: Any = None, *, name: str = "array_api"):
        missing = [f for f in REQUIRED_FUNCTIONS if not hasattr(xp, f)]
        missing += ["/".join(pair) for pair in _EITHER if not any(hasattr(xp, f) for f in pair)]
        if missing:
            raise MemcoreError(
                f"`xp` must implement the Array API functions the reference calls. "
                f"Received: {getattr(xp, '__name__', xp)!r} lacks {', '.join(missing)}"
            )
        self.xp = xp
        self.name = name
        # NumPy arrays stay accepted (masks, host data); torch, jax or cupy arrays are refused
        # unless the namespace is theirs.
        self.array_frameworks = ("numpy", xp.__name__.split(".")[0])
        self.array_kind = f"an array of {xp.__name__}"
        self.version = (
            f"{xp.__name__} {getattr(xp, '__version__', '?')} "
            f"(Array API {getattr(xp, '__array_api_version__', '?')})"
        )
        listed, default = _namespace_devices(xp)
        self._devices = {device_name(d): d for d in listed}
        self._default = device_name(default)
        if device is not None:
            chosen = device if isinstance(device, str) else device_name(device)
            self._device(chosen)  # raises, listing the devices, when it is unknown
            self._default = chosen
        self._caps: dict[str, Capabilities] = {}

    # ------------------------------------------------------------------ devices
    def devices(self) -> tuple[str, ...]:
        """Every device the namespace lists, by name; the default device first."""
        rest = [n for n in self._devices if n != self._default]
        return (self._default, *rest)

    def _device(self, device: str | None) -> Any:
        name = self._default if device is None else device
        if name not in self._devices:
            raise MemcoreError(
                f"`device` must be one of {self.devices()} for {self.xp.__name__}. "
                f"Received: device={device!r}"
            )
        return self._devices[name]

    def device_of(self, x: Any) -> str:
        """The name of the device ``x`` lives on (the conformance runner's hook)."""
        dev = getattr(x, "device", None)
        for name, known in self._devices.items():
            if dev == known:
                return name
        return device_name(dev)

    def capabilities(self, device: str | None = None) -> Capabilities:
        """float32 always; float64 where :func:`memcore.protocol.probe_float64` finds it.

        The probe allocates on the device, so a device without float64 (array_api_strict's
        ``no_float64``) is detected, not assumed; the result is cached per device.
        """
        name = self._default if device is None else device
        self._device(name)
        if name not in self._caps:
            dtypes = ("float32", "float64") if probe_float64(self, name) else ("float32",)
            self._caps[name] = Capabilities(
                dtypes=dtypes, autodiff="hand-written", dlpack=hasattr(self.xp, "from_dlpack")
            )
        return self._caps[name]

    def numerics_settings(self) -> dict[str, Any]:
        """What the runner records: the namespace and the standard version it implements."""
        return {
            "namespace": self.xp.__name__,
            "array_api_version": getattr(self.xp, "__array_api_version__", None),
        }

    # ------------------------------------------------------------------ arrays
    def from_numpy(
        self, x: np.ndarray, *, dtype: str | None = None, device: str | None = None
    ) -> Any:
        """A fresh array (never sharing memory with ``x``), cast to ``dtype`` on ``device``.

        The cast happens on the host, so a device without float64 never sees one; the
        copy goes through DLPack when the namespace has ``from_dlpack``.

        Raises:
            MemcoreError: unknown device, or a dtype the device does not support.
        """
        dev = self._device(device)
        host = np.array(x, dtype=check_dtype_arg(dtype), copy=True)
        try:
            if hasattr(self.xp, "from_dlpack"):
                try:
                    out = self.xp.from_dlpack(host, device=dev, copy=True)
                except TypeError:  # a namespace before 2023.12: no device/copy arguments
                    out = self.xp.asarray(host, device=dev, copy=True)
            else:
                out = self.xp.asarray(host, device=dev, copy=True)
        except _CONVERSION_ERRORS as exc:
            raise MemcoreError(
                f"`dtype` must be supported on device {device_name(dev)!r} of "
                f"{self.xp.__name__}. Received: dtype={host.dtype.name!r} ({exc})"
            ) from None
        return out

    def to_numpy(self, x: Any) -> np.ndarray:
        """A NumPy copy on the host: through DLPack, else the namespace's host conversion."""
        check_to_numpy_arg(self, x)
        if isinstance(x, np.ndarray):
            return np.array(x, copy=True)
        try:
            return np.array(np.from_dlpack(x), copy=True)
        except _CONVERSION_ERRORS:
            return np.array(x, copy=True)  # e.g. a device DLPack cannot export to the host

    def from_dlpack(self, obj: Any, *, device: str | None = None) -> Any:
        """``obj`` (anything exporting DLPack) as this namespace's array on ``device``;
        may share memory with ``obj`` (the :func:`memcore.protocol.transfer` hook)."""
        dev = self._device(device)
        try:
            return self.xp.from_dlpack(obj, device=dev)
        except TypeError:  # no device argument before 2023.12
            out = self.xp.from_dlpack(obj)
            return out if getattr(out, "device", dev) == dev else self.xp.asarray(out, device=dev)

    # ------------------------------------------------------------------ ops
    def _all_finite(self, x: Any) -> bool:
        return all_finite(x)

    def _forward(self, op: str, inputs: tuple[Any, ...], attributes: dict[str, Any]) -> Any:
        return reference.forward(op, *inputs, **attributes)[0]

    def _vjp(self, op: str, inputs: tuple[Any, ...], attributes: dict[str, Any], cotangent: Any):
        out, cache = reference.forward(op, *inputs, **attributes)
        # Gradients take the inputs' dtype (docs/semantics.md §5), never the cotangent's.
        dtype = inputs[0].dtype
        if OPS[op].multi_output:
            cotangent = tuple(self._cast(c, dtype) for c in cotangent)
        else:
            cotangent = self._cast(cotangent, dtype)
        return out, reference.backward(op, cache, cotangent)

    def _cast(self, x: Any, dtype: Any) -> Any:
        """``x`` in ``dtype``, as an array of the namespace (a NumPy cotangent is moved)."""
        if isinstance(x, np.ndarray) and self.xp.__name__.split(".")[0] != "numpy":
            x = self.xp.asarray(np.asarray(x))
        return x if x.dtype == dtype else self.xp.astype(x, dtype)


def default_backend() -> ArrayApiBackend:
    """The registered ``array_api`` backend: ``array_api_strict`` on its default device.

    Raises:
        MemcoreError: array-api-strict is not installed (``pip install 'memcore[array-api]'``).
    """
    try:
        import array_api_strict
    except ImportError:
        raise MemcoreError(
            "Backend 'array_api' needs array-api-strict, which is not installed. "
            "Install it with: pip install 'memcore[array-api]'"
        ) from None
    return ArrayApiBackend(array_api_strict)
