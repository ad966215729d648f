"""The CuPy backend: the reference's own array-namespace code on CuPy arrays, with fused
kernels on the hot paths (BMN, the SAB sparsifier, the slot-attention write).

There is no second copy of the math: unfused ops call ``memcore.reference`` on CuPy
arrays, fused ops (``fused.py``) produce the reference's caches so either backward can
consume them, and the routing drivers are ``memcore.reference.routing``'s, run on CuPy.
float16 computes in float32 (inputs upcast, outputs and gradients cast back).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs
import cupy as cp
import numpy as np

from memcore import reference
from memcore.backends.cupy import interop
from memcore.backends.cupy.fused import FUSED_OPS
from memcore.errors import MemcoreError
from memcore.ops import OPS
from memcore.options import options
from memcore.protocol import BackendBase, Capabilities, check_dtype_arg, check_to_numpy_arg

__all__ = ["CupyBackend"]

_HALF = np.dtype("float16")


def _up(x: Any) -> Any:
    """float16 -> float32 (the accumulation type); anything else unchanged."""
    if isinstance(x, cp.ndarray) and x.dtype == _HALF:
        return x.astype(cp.float32)
    return x


def _tree(fn, x: Any) -> Any:
    if isinstance(x, tuple):
        return tuple(_tree(fn, v) for v in x)
    if isinstance(x, list):
        return [_tree(fn, v) for v in x]
    if isinstance(x, Mapping):
        return {k: _tree(fn, v) for k, v in x.items()}
    return fn(x)


def _down(x: Any) -> Any:
    if isinstance(x, cp.ndarray) and x.dtype == cp.float32:
        return x.astype(cp.float16)
    return x


class CupyBackend(BackendBase):
    """CuPy arrays on CUDA devices; gradients from the reference's hand-written backward.

    Args:
        fused: run BMN, sparsify, slot attention, memory_write and sparse_retrieve
            through the fused kernels (default). ``False`` runs the reference code alone,
            the baseline the kernels are tested and benchmarked against.
    """

    name = "cupy"
    version = cp.__version__
    array_frameworks = ("cupy", "numpy")  # NumPy masks are accepted; float inputs: see validate
    array_kind = "a cupy.ndarray"

    def __init__(self, fused: bool = True) -> None:
        self.fused = bool(fused)

    # ------------------------------------------------------------------ devices, arrays
    def devices(self) -> tuple[str, ...]:
        try:
            count = cp.cuda.runtime.getDeviceCount()
        except cp.cuda.runtime.CUDARuntimeError:
            return ()
        return tuple(f"cuda:{i}" for i in range(count))

    def capabilities(self, device: str | None = None) -> Capabilities:
        if device is not None:
            interop.parse_device(device)
        return Capabilities(dtypes=("float16", "float32", "float64"), autodiff="hand-written", dlpack=True)

    def from_numpy(self, x: np.ndarray, *, dtype: str | None = None, device: str | None = None) -> Any:
        ordinal = interop.parse_device(device)
        host = np.asarray(x, dtype=check_dtype_arg(dtype))
        with cp.cuda.Device(ordinal):
            return cp.array(host, copy=True)

    def to_numpy(self, x: Any) -> np.ndarray:
        check_to_numpy_arg(self, x)
        if isinstance(x, cp.ndarray):
            return cp.asnumpy(x)
        return np.array(x, copy=True)

    def device_of(self, x: Any) -> str:
        """'cuda:N' for a CuPy array (the conformance runner's hook), else 'cpu'."""
        return f"cuda:{x.device.id}" if isinstance(x, cp.ndarray) else "cpu"

    def numerics_settings(self) -> dict[str, Any]:
        """What shapes float results: CuPy's TF32 switch (off unless CUPY_TF32=1) and the kernels."""
        return {"CUPY_TF32": os.environ.get("CUPY_TF32", "0"), "fused_kernels": self.fused,
                "float16": "computed in float32"}

    def _all_finite(self, x: Any) -> bool:
        return bool(cp.isfinite(x).all())

    # DLPack exchange on the same GPU (zero-copy).
    to_torch = staticmethod(interop.to_torch)
    from_torch = staticmethod(interop.from_torch)
    to_jax = staticmethod(interop.to_jax)
    from_jax = staticmethod(interop.from_jax)

    # ------------------------------------------------------------------ ops
    def _check_arrays(self, op: str, inputs: tuple[Any, ...]) -> None:
        for spec, x in zip(OPS[op].inputs, inputs):
            # Non-arrays get the shared validation's message; other frameworks' arrays get ours.
            if hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, cp.ndarray):
                raise MemcoreError(
                    f"`{spec.name}` must be a cupy.ndarray for the cupy backend. "
                    f"Received: {type(x).__module__}.{type(x).__name__}"
                )

    def validate(self, op: str, inputs, attributes):
        """Refuse non-CuPy inputs first (naming the argument), then the shared checks."""
        self._check_arrays(op, tuple(inputs))
        return super().validate(op, inputs, attributes)

    def _prepare(self, op: str, inputs: tuple[Any, ...]) -> tuple[tuple[Any, ...], bool]:
        half = any(x.dtype == _HALF for x in inputs)
        return (tuple(_up(x) for x in inputs) if half else inputs), half

    def _forward(self, op: str, inputs: tuple[Any, ...], attributes: dict[str, Any]) -> Any:
        inputs, half = self._prepare(op, inputs)
        if self.fused and op in FUSED_OPS:
            fwd, _, fwd_only = FUSED_OPS[op]
            out = fwd_only(*inputs, **attributes) if fwd_only else fwd(*inputs, **attributes)[0]
        else:
            with options(check_finite=False):  # validated once, at our entry
                out = reference.forward(op, *inputs, **attributes)[0]
        return _tree(_down, out) if half else out

    def _vjp(self, op: str, inputs: tuple[Any, ...], attributes: dict[str, Any], cotangent: Any):
        dtype = inputs[0].dtype
        inputs, half = self._prepare(op, inputs)
        # Gradients take the inputs' dtype (docs/semantics.md §5), never the cotangent's;
        # half inputs compute in float32 and are cast back below.
        work = cp.float32 if half else dtype
        cotangent = _tree(
            lambda c: cp.asarray(c).astype(work, copy=False),
            tuple(cotangent) if isinstance(cotangent, list) else cotangent,
        )
        if self.fused and op in FUSED_OPS:
            fwd, bwd, _ = FUSED_OPS[op]
            out, cache = fwd(*inputs, **attributes)
            grads = tuple(bwd(cache, tuple(cotangent) if OPS[op].multi_output else cotangent))
        else:
            with options(check_finite=False):
                out, cache = reference.forward(op, *inputs, **attributes)
            grads = reference.backward(op, cache, cotangent)
        if half:
            return _tree(_down, out), _tree(_down, grads)
        return out, grads

    # ------------------------------------------------------------------ routing
    def _route(self, driver: str, *args: Any, **kwargs: Any) -> Any:
        try:
            from memcore.reference import routing
        except ImportError as exc:
            raise MemcoreError(
                f"`{driver}` needs memcore.reference.routing, which could not be imported: {exc}"
            ) from None
        half = any(
            isinstance(a, cp.ndarray) and a.dtype == _HALF
            for a in _leaves(args)
        )
        if half:
            args = _tree(_up, args)
        result = getattr(routing, driver)(*args, **kwargs)
        if not half:
            return result
        return attrs.evolve(
            result,
            grads=_tree(_down, dict(result.grads)),
            d_state0=_tree(_down, result.d_state0),
            final_state=_tree(_down, result.final_state),
        )

    def bptt(self, step: str, params, xs, state0, targets, **kwargs: Any):
        """Plain BPTT of ``step`` ("memformer" or "sab") on CuPy arrays (see the routing contract)."""
        return self._route("bptt", step, params, xs, state0, targets, **kwargs)

    def mrbp(self, params, xs, M0, targets, **kwargs: Any):
        """Memformer MRBP (Alg. 1) on CuPy arrays: M_0..M_T kept, per-step recompute + VJP."""
        return self._route("mrbp", params, xs, M0, targets, **kwargs)

    def sab_bptt(self, params, xs, state0, targets, **kwargs: Any):
        """SAB with chunked truncation, whole masked graph kept, on CuPy arrays."""
        return self._route("sab_bptt", params, xs, state0, targets, **kwargs)

    def sab_sparse_replay(self, params, xs, state0, targets, **kwargs: Any):
        """SAB sparse replay on CuPy arrays (chunk-boundary states and memories only)."""
        return self._route("sab_sparse_replay", params, xs, state0, targets, **kwargs)


def _leaves(x: Any):
    if isinstance(x, (tuple, list)):
        for v in x:
            yield from _leaves(v)
    elif isinstance(x, Mapping):
        for v in x.values():
            yield from _leaves(v)
    else:
        yield x
