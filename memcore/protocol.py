"""The backend protocol: what every backend, ours or a third party's, provides.

A backend exposes every op of :data:`memcore.ops.OPS` through ``forward`` and ``vjp``,
converts arrays to and from NumPy, names its devices and declares its capabilities.
:class:`BackendBase` supplies validation and the ``backend.<op>(...)`` shortcuts.

Helpers that work on any backend (``docs/porting.md`` describes the contract):

* :func:`list_devices`: the backend's device names, checked.
* :func:`probe_float64`: allocate a float64 array on a device and check that it really is
  float64 (a device may lack it, or a framework may silently compute in float32).
* :func:`capability_flags`: declared capabilities, the probe and the routing methods.
* :func:`to_dlpack_capable`, :func:`from_dlpack`, :func:`transfer`: move arrays between
  backends through DLPack when both sides can, else through a NumPy copy on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs
import numpy as np

from memcore.arrays import array_framework, check_dtype_arg, check_to_numpy_arg
from memcore.errors import MemcoreError
from memcore.ops import OPS, get_op
from memcore.opspec import FLOAT_DTYPES, Tensor, dtype_name
from memcore.options import get_options

__all__ = [
    "ROUTING_METHODS",
    "Backend",
    "BackendBase",
    "Capabilities",
    "Transfer",
    "array_framework",
    "capability_flags",
    "check_dtype_arg",
    "check_to_numpy_arg",
    "from_dlpack",
    "list_devices",
    "probe_float64",
    "protocol_gaps",
    "to_dlpack_capable",
    "transfer",
]

ROUTING_METHODS = ("bptt", "mrbp", "sab_bptt", "sab_sparse_replay")

@attrs.frozen
class Capabilities:
    """What a backend can do on one device.

    Attributes:
        dtypes: float dtypes it computes in, e.g. ("float32", "float64").
        autodiff: "native" (framework autodiff, an independent check of the reference's
            backward) or "hand-written" (runs the reference's backward).
        dlpack: arrays can be exchanged through DLPack.
    """

    dtypes: tuple[str, ...]
    autodiff: str
    dlpack: bool = False

    @property
    def float64(self) -> bool:
        """Whether float64 is among the declared dtypes (see :func:`probe_float64`)."""
        return "float64" in self.dtypes

    def flags(self) -> dict[str, Any]:
        """The capabilities as plain data, for reports."""
        return {
            "dtypes": list(self.dtypes),
            "float64": self.float64,
            "autodiff": self.autodiff,
            "dlpack": self.dlpack,
        }


@runtime_checkable
class Backend(Protocol):
    """The protocol the conformance suite runs against."""

    name: str
    version: str

    def devices(self) -> tuple[str, ...]: ...

    def capabilities(self, device: str | None = None) -> Capabilities: ...

    def from_numpy(self, x: np.ndarray, *, dtype: str | None = None, device: str | None = None) -> Any: ...

    def to_numpy(self, x: Any) -> np.ndarray: ...

    def forward(self, op: str, *inputs: Any, **attributes: Any) -> Any: ...

    def vjp(
        self, op: str, inputs: Sequence[Any], attributes: Mapping[str, Any], cotangent: Any
    ) -> tuple[Any, tuple[Any, ...]]: ...

    # Routing drivers (docs/semantics.md, "Routing (time)"); all return RoutingResult.
    def bptt(self, step: str, params: Mapping[str, Any], xs: Any, state0: Any, targets: Any, *,
             config: Any, loss: Any = ..., resets: Any = None, token_mask: Any = None,
             truncate_every: int | None = None) -> Any: ...

    def mrbp(self, params: Mapping[str, Any], xs: Any, M0: Any, targets: Any, *, config: Any,
             loss: Any = ..., resets: Any = None, token_mask: Any = None,
             truncate_every: int | None = None) -> Any: ...

    def sab_bptt(self, params: Mapping[str, Any], xs: Any, state0: Any, targets: Any, *,
                 config: Any, loss: Any = ...) -> Any: ...

    def sab_sparse_replay(self, params: Mapping[str, Any], xs: Any, state0: Any, targets: Any, *,
                          config: Any, loss: Any = ...) -> Any: ...


class BackendBase:
    """Shared machinery: validated dispatch to ``_forward``/``_vjp`` and op shortcuts.

    Subclasses implement ``_forward(op, inputs, attrs)``, ``_vjp(op, inputs, attrs, ct)``,
    ``_all_finite(x)``, ``devices``, ``capabilities``, ``from_numpy`` and ``to_numpy``.

    Attributes:
        array_frameworks: the frameworks (of ``numpy``, ``torch``, ``jax``, ``cupy``) whose
            arrays the backend accepts; an array of another of them is refused at the entry
            with a ``MemcoreError`` (see :func:`array_framework`). Empty: no such check.
        array_kind: how messages name the backend's arrays, e.g. "a torch.Tensor".
    """

    name: str = "base"
    version: str = "0"
    array_frameworks: tuple[str, ...] = ()
    array_kind: str = "an array"

    def _all_finite(self, x: Any) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward(self, op: str, inputs: tuple[Any, ...], attributes: dict[str, Any]) -> Any:
        raise NotImplementedError  # pragma: no cover - abstract

    def _vjp(self, op: str, inputs: tuple[Any, ...], attributes: dict[str, Any], cotangent: Any):
        raise NotImplementedError  # pragma: no cover - abstract

    def check_array_type(self, name: str, x: Any) -> None:
        """Refuse an array of a framework this backend does not take (e.g. a torch tensor
        given to the numpy backend), naming the argument; non-arrays pass through to the
        shape checks, which name them."""
        found = array_framework(x)
        if found is None or not self.array_frameworks or found in self.array_frameworks:
            return
        raise MemcoreError(
            f"`{name}` must be {self.array_kind} for the {self.name} backend. "
            f"Received: {type(x).__module__}.{type(x).__name__} (a {found} array; convert it "
            f"with backend.from_numpy or memcore.protocol.transfer)"
        )

    def validate(self, op: str, inputs: Sequence[Any], attributes: Mapping[str, Any]) -> dict[str, Any]:
        """Check a call against the op's spec; return attributes with defaults filled."""
        spec = get_op(op)
        if not isinstance(attributes, Mapping):
            raise MemcoreError(
                f"`attributes` of {op} must be a mapping of attribute names to values, e.g. "
                f"{{}} or {{'num_heads': 2}}. Received: {type(attributes).__name__}"
            )
        for t, x in zip(spec.inputs, inputs):
            self.check_array_type(t.name, x)
        for a in spec.attributes:
            if isinstance(a, Tensor) and attributes.get(a.name) is not None:
                self.check_array_type(a.name, attributes[a.name])
        finite = self._all_finite if get_options().check_finite else None
        _, filled = spec.validate(tuple(inputs), dict(attributes), all_finite=finite)
        return filled

    def forward(self, op: str, *inputs: Any, **attributes: Any) -> Any:
        """Run op ``op`` forward: ``out`` (a tuple for multi-output ops)."""
        filled = self.validate(op, inputs, attributes)
        return self._forward(op, tuple(inputs), filled)

    def vjp(self, op: str, inputs: Sequence[Any], attributes: Mapping[str, Any], cotangent: Any):
        """``(out, grads)``: grads has one entry per input, ``None`` for non-differentiable ones.

        The cotangent is checked before dispatch (:meth:`check_cotangent`): exactly the
        output's shape, a floating dtype, finite when ``check_finite`` is on, one array per
        output. Gradients take the inputs' dtype whatever the cotangent's float dtype.
        """
        if not isinstance(inputs, (tuple, list)):
            raise MemcoreError(
                f"`inputs` of {op} must be a tuple or list of the op's arrays "
                f"({', '.join(get_op(op).input_names)}). Received: {type(inputs).__name__}"
            )
        filled = self.validate(op, inputs, attributes)
        self.check_cotangent(op, tuple(inputs), filled, cotangent)
        return self._vjp(op, tuple(inputs), filled, cotangent)

    def check_cotangent(
        self, op: str, inputs: tuple[Any, ...], filled: Mapping[str, Any], cotangent: Any
    ) -> None:
        """Raise ``MemcoreError`` unless ``cotangent`` fits the outputs of ``op`` on ``inputs``.

        One array per output (a tuple or list for multi-output ops), each of exactly the
        output's shape (no broadcasting, no extra axis), of a floating dtype, of this
        backend's array type, and finite when ``check_finite`` is on.
        """
        spec = get_op(op)
        bound, _ = spec.validate(inputs, dict(filled), all_finite=None)
        shapes = spec.output_shapes(bound, filled)
        if spec.multi_output:
            names = ", ".join(n for n, _ in spec.outputs)
            if not isinstance(cotangent, (tuple, list)) or len(cotangent) != len(spec.outputs):
                got = (
                    f"{type(cotangent).__name__} of length {len(cotangent)}"
                    if isinstance(cotangent, (tuple, list))
                    else type(cotangent).__name__
                )
                raise MemcoreError(
                    f"`cotangent` of {op} must be a tuple of {len(spec.outputs)} arrays "
                    f"({names}). Received: {got}"
                )
            labels = [f"cotangent[{i}]" for i in range(len(spec.outputs))]
            cts = tuple(cotangent)
        else:
            labels, cts = ["cotangent"], (cotangent,)
        check = get_options().check_finite
        for label, ct, (out_name, sym), shape in zip(labels, cts, spec.outputs, shapes):
            want = f"({', '.join(sym)}) = {shape}"
            if ct is None or not (hasattr(ct, "shape") and hasattr(ct, "dtype")):
                raise MemcoreError(
                    f"`{label}` of {op} must be an array of the shape of output `{out_name}`, "
                    f"{want}. Received: {type(ct).__name__}"
                )
            self.check_array_type(label, ct)
            dt = dtype_name(ct)
            if dt not in FLOAT_DTYPES:
                raise MemcoreError(
                    f"`{label}` of {op} must have a floating dtype ({', '.join(FLOAT_DTYPES)}). "
                    f"Received: {label}.dtype={dt}"
                )
            got = tuple(int(d) for d in ct.shape)
            if got != shape:
                raise MemcoreError(
                    f"`{label}` of {op} must have the shape of output `{out_name}`, {want}. "
                    f"Received: {label}.shape={got}"
                )
            if check and not self._all_finite(ct):
                raise MemcoreError(
                    f"`{label}` of {op} must be finite (no NaN or Inf). "
                    f"Received: {label} with non-finite entries"
                )

    def __getattr__(self, item: str) -> Callable[..., Any]:
        if item in OPS:
            def call(*inputs: Any, **attributes: Any) -> Any:
                return self.forward(item, *inputs, **attributes)

            call.__name__ = item
            return call
        raise AttributeError(f"{type(self).__name__!s} has no attribute {item!r}")

    def __repr__(self) -> str:
        return f"<memcore backend {self.name!r} {self.version}>"


# ------------------------------------------------------------------ devices and float64
def list_devices(backend: Any) -> tuple[str, ...]:
    """``backend.devices()``, checked: a non-empty tuple of distinct non-empty strings.

    Raises:
        MemcoreError: the backend lists no device, or a name that is not a string.
    """
    devices = tuple(backend.devices())
    name = getattr(backend, "name", type(backend).__name__)
    ok = (
        bool(devices)
        and all(isinstance(d, str) and d for d in devices)
        and len(set(devices)) == len(devices)
    )
    if not ok:
        raise MemcoreError(
            f"`devices()` of backend {name!r} must return distinct non-empty device names. "
            f"Received: {devices!r}"
        )
    return devices


# 1 + 2**-40 needs 41 mantissa bits: float32 (24) rounds it to 1, float64 (53) keeps it.
_PROBE = np.array([1.0 + 2.0**-40, -3.0 - 2.0**-45], dtype=np.float64)


def probe_float64(backend: Any, device: str | None = None) -> bool:
    """Whether ``device`` really holds float64: allocate, read back, compare bit for bit.

    The probe puts two values that float32 cannot represent on the device with
    ``from_numpy(..., dtype="float64")``, then requires the array's dtype to read
    "float64" and ``to_numpy`` to return exactly those values. Any exception (a device
    without float64 refusing the dtype) counts as no float64. It never consults
    ``capabilities()``, so a backend may call it from there.
    """
    try:
        x = backend.from_numpy(_PROBE, dtype="float64", device=device)
        if dtype_name(x) != "float64":
            return False  # e.g. JAX without jax_enable_x64 hands back float32
        back = np.asarray(backend.to_numpy(x))
    except Exception:  # noqa: BLE001 - refusing float64 in any way means "no float64"
        return False
    return back.dtype == np.float64 and back.shape == _PROBE.shape and bool(np.all(back == _PROBE))


def protocol_gaps(backend: Any) -> list[str]:
    """The protocol members ``backend`` lacks (empty when it has them all).

    Required: ``name``, ``version``, ``devices``, ``capabilities``, ``from_numpy``,
    ``to_numpy``, ``forward``, ``vjp`` and the routing methods of :data:`ROUTING_METHODS`.
    """
    gaps = [a for a in ("name", "version") if not isinstance(getattr(backend, a, None), str)]
    methods = ("devices", "capabilities", "from_numpy", "to_numpy", "forward", "vjp")
    gaps += [m for m in methods + ROUTING_METHODS if not callable(getattr(backend, m, None))]
    return gaps


def capability_flags(backend: Any, device: str | None = None) -> dict[str, Any]:
    """Declared capabilities on ``device``, the float64 probe, and the routing methods present.

    ``float64_declared`` and ``float64_probed`` disagree when a backend declares float64
    that the device does not deliver (or the reverse): the conformance suite trusts the
    declaration, so that is a bug to fix in ``capabilities()``.
    """
    caps = backend.capabilities(device)
    return {
        **caps.flags(),
        "float64_declared": caps.float64,
        "float64_probed": probe_float64(backend, device),
        "routing": [m for m in ROUTING_METHODS if callable(getattr(backend, m, None))],
    }


# ------------------------------------------------------------------ DLPack
def _exports_dlpack(x: Any) -> bool:
    return callable(getattr(x, "__dlpack__", None)) and callable(
        getattr(x, "__dlpack_device__", None)
    )


def to_dlpack_capable(backend: Any, x: Any) -> Any:
    """``x`` itself when it exports DLPack and the backend declares DLPack support on the
    array's device, else a NumPy copy on the host (``backend.to_numpy``), which exports it.

    The result may share memory with ``x``: read it, never write into it.
    """
    if _exports_dlpack(x):
        device_of = getattr(type(backend), "device_of", None)
        device = backend.device_of(x) if device_of is not None else None
        try:
            if backend.capabilities(device).dlpack:
                return x
        except MemcoreError:
            pass  # a device name the backend does not list: take the host path
    return np.asarray(backend.to_numpy(x))


def _host_copy(obj: Any, source: Any) -> np.ndarray:
    if source is not None:
        return np.asarray(source.to_numpy(obj))
    if isinstance(obj, np.ndarray):
        return obj
    if _exports_dlpack(obj):
        try:
            return np.from_dlpack(obj)
        except (BufferError, RuntimeError, TypeError, ValueError):
            pass  # not on the host: np.asarray below is the last resort
    return np.asarray(obj)


@attrs.frozen
class Transfer:
    """An array moved to a backend and the route it took: "dlpack" or "host"."""

    array: Any
    route: str


def transfer(x: Any, target: Any, *, source: Any = None, device: str | None = None) -> Transfer:
    """Move ``x`` onto ``target`` (on ``device``), through DLPack when possible.

    Args:
        x: an array of ``source`` (or any object exporting DLPack, or a NumPy array).
        target: the receiving backend. DLPack is tried when it declares
            ``capabilities(device).dlpack`` and has a ``from_dlpack(obj, *, device)`` hook.
        source: the backend ``x`` belongs to; its ``to_numpy`` makes the host copy when
            DLPack fails or is unavailable (default: NumPy's own conversion).
        device: a device name of ``target`` (default: its default device).

    Returns:
        Transfer(array, route): route "dlpack" (the array may share memory with ``x``)
        or "host" (a copy through NumPy). The dtype is kept either way.
    """
    obj = to_dlpack_capable(source, x) if source is not None else x
    hook = getattr(target, "from_dlpack", None)
    if callable(hook) and _exports_dlpack(obj) and target.capabilities(device).dlpack:
        try:
            return Transfer(hook(obj, device=device), "dlpack")
        except (BufferError, RuntimeError, TypeError, ValueError):
            pass  # e.g. a device pair DLPack cannot bridge: copy through the host
    host = _host_copy(obj, None if obj is not x else source)
    return Transfer(target.from_numpy(host, device=device), "host")


def from_dlpack(backend: Any, obj: Any, *, device: str | None = None) -> Any:
    """``obj`` (anything exporting DLPack, or a NumPy array) as an array of ``backend``:
    through DLPack when the backend can import it, else through a host copy.

    The DLPack route may share memory with ``obj``; see :func:`transfer`.
    """
    return transfer(obj, backend, device=device).array
