"""The reference, served through the backend protocol."""

from __future__ import annotations

from typing import Any

import numpy as np

from memcore import reference
from memcore.errors import MemcoreError
from memcore.ops import OPS
from memcore.protocol import BackendBase, Capabilities, check_dtype_arg, check_to_numpy_arg
from memcore.reference._xp import all_finite
from memcore.routing_delegate import RoutingDelegate

__all__ = ["NumpyBackend"]


class NumpyBackend(RoutingDelegate, BackendBase):
    """NumPy arrays on the CPU; gradients from the reference's hand-written backward.

    The routing drivers (``bptt``, ``mrbp``, ``sab_bptt``, ``sab_sparse_replay``) come from
    :class:`~memcore.routing_delegate.RoutingDelegate` over :mod:`memcore.reference.routing`.
    """

    name = "numpy"
    version = np.__version__
    array_frameworks = ("numpy",)
    array_kind = "a NumPy array"

    def devices(self) -> tuple[str, ...]:
        return ("cpu",)

    def capabilities(self, device: str | None = None) -> Capabilities:
        return Capabilities(dtypes=("float32", "float64"), autodiff="hand-written", dlpack=True)

    def from_numpy(self, x: np.ndarray, *, dtype: str | None = None, device: str | None = None) -> Any:
        if device not in (None, "cpu"):
            raise MemcoreError(f"`device` must be one of ('cpu',) for numpy. Received: device={device!r}")
        return np.array(x, dtype=check_dtype_arg(dtype), copy=True)

    def to_numpy(self, x: Any) -> np.ndarray:
        check_to_numpy_arg(self, x)
        return np.array(x, copy=True)

    def _all_finite(self, x: Any) -> bool:
        return all_finite(x)

    def _forward(self, op: str, inputs: tuple[Any, ...], attributes: dict[str, Any]) -> Any:
        return reference.forward(op, *inputs, **attributes)[0]

    def _vjp(self, op: str, inputs: tuple[Any, ...], attributes: dict[str, Any], cotangent: Any):
        out, cache = reference.forward(op, *inputs, **attributes)
        # Gradients take the inputs' dtype (docs/semantics.md §5), never the cotangent's.
        dtype = inputs[0].dtype
        if OPS[op].multi_output:
            cotangent = tuple(np.asarray(c).astype(dtype, copy=False) for c in cotangent)
        else:
            cotangent = np.asarray(cotangent).astype(dtype, copy=False)
        return out, reference.backward(op, cache, cotangent)
