"""The JAX backend: every op in ``jax.numpy``, gradients from ``jax.vjp``.

float64 is offered only when ``jax_enable_x64`` is on; this module reads that flag and
never sets it (it is process-wide and sticky: set ``JAX_ENABLE_X64=1`` before JAX is
first imported). Ops run jitted with their scalar attributes as static arguments.

The ops compose with ``jax.jit``, ``jax.grad`` and ``jax.vmap``: shapes and dtypes are
validated while tracing as always, but the finiteness check (``check_finite``) is skipped
for traced values, since a tracer has no concrete content to look at (``bool`` of it
raises ``TracerBoolConversionError``); concrete arrays are checked exactly as before.
Inside ``with checkify_finite():`` the check is staged as a ``jax.experimental.checkify``
check instead, reported when the function is wrapped in ``checkify.checkify``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memcore.backends.jax.attention import memory_read, slot_attention
from memcore.backends.jax.lstm import lstm_cell
from memcore.backends.jax.memory import bmn, memory_init, memory_reset, memory_write
from memcore.backends.jax.sab import sab_scores, sparse_retrieve, sparsify
from memcore.errors import MemcoreError
from memcore.ops import OPS
from memcore.opspec import Tensor
from memcore.options import get_options
from memcore.protocol import BackendBase, Capabilities, check_dtype_arg, check_to_numpy_arg
from memcore.routing_delegate import RoutingDelegate

__all__ = ["JaxBackend", "OP_FUNCTIONS", "checkify_finite", "is_traced"]

OP_FUNCTIONS = {
    "memory_read": memory_read,
    "slot_attention": slot_attention,
    "bmn": bmn,
    "memory_write": memory_write,
    "memory_init": memory_init,
    "memory_reset": memory_reset,
    "lstm_cell": lstm_cell,
    "sab_scores": sab_scores,
    "sparsify": sparsify,
    "sparse_retrieve": sparse_retrieve,
}
assert set(OP_FUNCTIONS) == set(OPS), "every registered op needs a JAX implementation"


_CHECKIFY: contextvars.ContextVar[bool] = contextvars.ContextVar("memcore_jax_checkify", default=False)


def is_traced(x: Any) -> bool:
    """Whether ``x`` is a tracer (inside ``jit``, ``grad``, ``vmap``...): no concrete values."""
    return isinstance(x, jax.core.Tracer)


@contextlib.contextmanager
def checkify_finite(enabled: bool = True) -> Iterator[None]:
    """Stage the finiteness check of traced inputs as ``jax.experimental.checkify`` checks.

    Off by default, so ops trace under a plain ``jax.jit``: an unfunctionalized checkify
    check cannot be staged. Use it around the tracing, and wrap the function::

        with checkify_finite():
            err, out = jax.jit(checkify.checkify(f))(x)
        err.throw()  # "`x` must be finite (no NaN or Inf). ..."

    Concrete (untraced) inputs are checked eagerly either way, with ``MemcoreError``.
    """
    token = _CHECKIFY.set(bool(enabled))
    try:
        yield
    finally:
        _CHECKIFY.reset(token)


def _split(
    op: str, attributes: dict[str, Any]
) -> tuple[tuple[tuple[str, Any], ...], dict[str, Any]]:
    """Scalar attributes (static, hashable) and array attributes (traced)."""
    arrays = {a.name for a in OPS[op].attributes if isinstance(a, Tensor)}
    static = tuple(sorted((k, v) for k, v in attributes.items() if k not in arrays))
    return static, {k: v for k, v in attributes.items() if k in arrays}


@functools.partial(jax.jit, static_argnames=("op", "static"))
def _forward_jit(inputs, arrays, *, op, static):
    return OP_FUNCTIONS[op](*inputs, **dict(static), **arrays)


@functools.partial(jax.jit, static_argnames=("op", "static"))
def _vjp_jit(inputs, arrays, cotangent, *, op, static):
    def fn(*xs):
        return OP_FUNCTIONS[op](*xs, **dict(static), **arrays)

    out, pull = jax.vjp(fn, *inputs)
    ct = jax.tree_util.tree_map(lambda c, o: jnp.asarray(c, dtype=o.dtype), cotangent, out)
    return out, pull(ct)


class JaxBackend(RoutingDelegate, BackendBase):
    """JAX arrays on CPU or GPU; gradients from JAX autodiff (``jax.vjp``)."""

    name = "jax"
    array_frameworks = ("jax", "numpy")
    array_kind = "a jax.Array (or a NumPy array)"
    routing_module = "memcore.backends.jax.routing"
    version = jax.__version__

    # ------------------------------------------------------------------ devices
    def devices(self) -> tuple[str, ...]:
        """ "cpu" plus "cuda:N" for each NVIDIA GPU ("gpu:N" for other GPU platforms)."""
        out = ["cpu"]
        try:
            gpus = jax.devices("gpu")
        except RuntimeError:
            gpus = []
        for i, d in enumerate(gpus):
            kind = (
                "cuda"
                if "nvidia" in str(getattr(d, "device_kind", "")).lower() or d.platform == "cuda"
                else "gpu"
            )
            out.append(f"{kind}:{i}")
        return tuple(out)

    def _device(self, device: str | None) -> Any:
        if device is None:
            return None
        names = self.devices()
        if device == "cpu":
            return jax.devices("cpu")[0]
        alias = device.replace("cuda:", "gpu:")
        for i, name in enumerate(n for n in names if n != "cpu"):
            if device == name or alias == f"gpu:{i}":
                return jax.devices("gpu")[i]
        raise MemcoreError(f"`device` must be one of {names} for jax. Received: device={device!r}")

    def capabilities(self, device: str | None = None) -> Capabilities:
        """bfloat16/float16/float32 always; float64 only when ``jax_enable_x64`` is on."""
        self._device(device)
        dtypes = ("bfloat16", "float16", "float32") + (("float64",) if self.x64_enabled() else ())
        return Capabilities(dtypes=dtypes, autodiff="native", dlpack=True)

    # ------------------------------------------------------------------ numerics
    @staticmethod
    def x64_enabled() -> bool:
        """The current ``jax_enable_x64`` flag (read, never set)."""
        return bool(jax.config.jax_enable_x64)

    def numerics_settings(self) -> dict[str, Any]:
        """Settings that change results, for the conformance report."""
        return {
            "jax_enable_x64": self.x64_enabled(),
            "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
        }

    def pin_numerics(self) -> dict[str, Any]:
        """Full float32 matmul precision (no TF32 / bf16 passes on GPUs); returns the settings."""
        jax.config.update("jax_default_matmul_precision", "highest")
        return self.numerics_settings()

    # ------------------------------------------------------------------ arrays
    def from_numpy(
        self, x: np.ndarray, *, dtype: str | None = None, device: str | None = None
    ) -> Any:
        dtype = check_dtype_arg(dtype)
        arr = np.asarray(x)
        want = np.dtype(dtype) if dtype is not None and dtype != "bfloat16" else arr.dtype
        wants_x64 = str(dtype) == "float64" or (dtype is None and arr.dtype == np.float64)
        if wants_x64 and not self.x64_enabled():
            raise MemcoreError(
                "`dtype` float64 needs jax_enable_x64 "
                "(set JAX_ENABLE_X64=1 before importing jax). "
                f"Received: dtype={dtype or arr.dtype}, jax_enable_x64=False"
            )
        if dtype == "bfloat16":
            want = jnp.bfloat16
        if np.issubdtype(arr.dtype, np.integer) and dtype is None and not self.x64_enabled():
            want = np.int32
        return jax.device_put(jnp.asarray(arr, dtype=want), self._device(device))

    def to_numpy(self, x: Any) -> np.ndarray:
        check_to_numpy_arg(self, x)
        if is_traced(x):
            raise MemcoreError(
                "`x` of to_numpy must be a concrete array, not a traced value (inside "
                f"jit, grad or vmap it has no values yet). Received: {type(x).__name__}"
            )
        return np.array(jax.device_get(x), copy=True)

    def _all_finite(self, x: Any) -> bool:
        """True when no entry is NaN or Inf; True for a tracer, which has no values to check
        (see the module docstring and :func:`checkify_finite`)."""
        if is_traced(x):
            return True
        if isinstance(x, jax.Array):
            # A concrete array closed over inside jit would give a traced result: evaluate now.
            with jax.ensure_compile_time_eval():
                return bool(jnp.all(jnp.isfinite(x)))
        return bool(np.all(np.isfinite(np.asarray(x))))

    # ------------------------------------------------------------------ ops
    def validate(self, op: str, inputs: Sequence[Any], attributes: Mapping[str, Any]) -> dict[str, Any]:
        """The shared checks; inside :func:`checkify_finite`, traced float inputs also get a
        staged checkify finiteness check."""
        filled = super().validate(op, inputs, attributes)
        if _CHECKIFY.get() and get_options().check_finite:
            from jax.experimental import checkify

            named = list(zip(OPS[op].inputs, inputs))
            for t, x in named:
                if t.kind == "float" and is_traced(x):
                    checkify.check(
                        jnp.all(jnp.isfinite(x)),
                        f"`{t.name}` must be finite (no NaN or Inf). "
                        f"Received: {t.name} with non-finite entries",
                    )
        return filled

    def _forward(self, op: str, inputs: tuple[Any, ...], attributes: dict[str, Any]) -> Any:
        static, arrays = _split(op, attributes)
        return _forward_jit(tuple(inputs), arrays, op=op, static=static)

    def _vjp(self, op: str, inputs: tuple[Any, ...], attributes: dict[str, Any], cotangent: Any):
        static, arrays = _split(op, attributes)
        ct = tuple(cotangent) if OPS[op].multi_output else cotangent
        out, grads = _vjp_jit(tuple(inputs), arrays, ct, op=op, static=static)
        diff = OPS[op].differentiable
        return out, tuple(g if d else None for g, d in zip(grads, diff))

