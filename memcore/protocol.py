"""The backend protocol: what every backend, ours or a third party's, provides.

A backend exposes every op of :data:`memcore.ops.OPS` through ``forward`` and ``vjp``,
converts arrays to and from NumPy, names its devices and declares its capabilities.
:class:`BackendBase` supplies validation and the ``backend.<op>(...)`` shortcuts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs
import numpy as np

from memcore.errors import MemcoreError
from memcore.ops import OPS, get_op
from memcore.options import get_options

__all__ = ["Backend", "BackendBase", "Capabilities"]


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
        return "float64" in self.dtypes


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
    """

    name: str = "base"
    version: str = "0"

    def _all_finite(self, x: Any) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward(self, op: str, inputs: tuple[Any, ...], attributes: dict[str, Any]) -> Any:
        raise NotImplementedError  # pragma: no cover - abstract

    def _vjp(self, op: str, inputs: tuple[Any, ...], attributes: dict[str, Any], cotangent: Any):
        raise NotImplementedError  # pragma: no cover - abstract

    def validate(self, op: str, inputs: Sequence[Any], attributes: Mapping[str, Any]) -> dict[str, Any]:
        """Check a call against the op's spec; return attributes with defaults filled."""
        finite = self._all_finite if get_options().check_finite else None
        _, filled = get_op(op).validate(tuple(inputs), dict(attributes), all_finite=finite)
        return filled

    def forward(self, op: str, *inputs: Any, **attributes: Any) -> Any:
        """Run op ``op`` forward: ``out`` (a tuple for multi-output ops)."""
        filled = self.validate(op, inputs, attributes)
        return self._forward(op, tuple(inputs), filled)

    def vjp(self, op: str, inputs: Sequence[Any], attributes: Mapping[str, Any], cotangent: Any):
        """``(out, grads)``: grads has one entry per input, ``None`` for non-differentiable ones."""
        spec = get_op(op)
        filled = self.validate(op, inputs, attributes)
        if spec.multi_output and (not isinstance(cotangent, (tuple, list)) or len(cotangent) != len(spec.outputs)):
            raise MemcoreError(
                f"`cotangent` of {op} must be a tuple of {len(spec.outputs)} arrays. "
                f"Received: {type(cotangent).__name__}"
            )
        return self._vjp(op, tuple(inputs), filled, cotangent)

    def __getattr__(self, item: str) -> Callable[..., Any]:
        if item in OPS:
            def call(*inputs: Any, **attributes: Any) -> Any:
                return self.forward(item, *inputs, **attributes)

            call.__name__ = item
            return call
        raise AttributeError(f"{type(self).__name__!s} has no attribute {item!r}")

    def __repr__(self) -> str:
        return f"<memcore backend {self.name!r} {self.version}>"
