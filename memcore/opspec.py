"""Ops declared as data: inputs with symbolic shapes, attributes, samples and error inputs.

One :class:`OpSpec` per op drives validation at every backend's public entry, the
conformance suite, the docs tables and the CLI. Shapes use the glossary of
``docs/semantics.md``: B batch, L tokens, K slots, D width, H heads, I LSTM input,
Hd hidden, N memories, A scorer width. A shape entry is a symbol ("B") or a small
expression over symbols bound earlier ("I+Hd", "4*Hd").
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import numpy as np

from memcore.errors import MemcoreError

__all__ = [
    "Attr",
    "ErrorCase",
    "FLOAT_DTYPES",
    "OpSpec",
    "Sample",
    "Sizes",
    "Tensor",
    "dtype_name",
]

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_SYMBOL = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")


def dtype_name(x: Any) -> str:
    """Framework-neutral dtype name: 'float32' for numpy, torch, jax, cupy and Array API
    libraries alike (torch and array-api-strict prefix the name with their module)."""
    return str(getattr(x, "dtype", "")).rsplit(".", 1)[-1]


@attrs.frozen
class Tensor:
    """An array argument.

    Attributes:
        name: argument name as users spell it.
        shape: symbolic shape, e.g. ("B", "K", "D").
        differentiable: whether the op's VJP returns a gradient for it.
        kind: "float" or "bool".
        optional: ``None`` is accepted (array attributes such as ``token_mask``).
    """

    name: str
    shape: tuple[str, ...]
    differentiable: bool = True
    kind: str = "float"
    optional: bool = False


_REQUIRED = object()


@attrs.frozen
class Attr:
    """A scalar attribute with its type and validator (raises ``MemcoreError``)."""

    name: str
    types: tuple[type, ...]
    default: Any = _REQUIRED
    check: Callable[[Any], None] | None = None

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


@attrs.frozen
class Sizes:
    """Concrete dimensions drawn by samplers and strategies (see the glossary)."""

    B: int = 2
    L: int = 3
    K: int = 4
    H: int = 2
    dh: int = 3
    I: int = 3
    Hd: int = 4
    N: int = 5
    A: int = 3

    @property
    def D(self) -> int:
        return self.H * self.dh


@attrs.frozen
class Sample:
    """Inputs (in declared order) and attributes for one call of an op."""

    inputs: tuple[Any, ...]
    attrs: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class ErrorCase:
    """A call that must raise ``MemcoreError`` whose message matches ``match`` (a regex)."""

    label: str
    sample: Sample
    match: str


def _eval_dim(expr: str, bound: Mapping[str, int]) -> int:
    if _SYMBOL.match(expr):
        return bound[expr]
    names = re.findall(r"[A-Za-z][A-Za-z0-9]*", expr)
    env = {n: bound[n] for n in names}
    if not re.fullmatch(r"[A-Za-z0-9+*() ]+", expr):
        raise AssertionError(f"bad dim expression {expr!r}")
    return int(eval(expr, {"__builtins__": {}}, env))  # noqa: S307 - vetted by the regex


@attrs.frozen
class OpSpec:
    """One op: its signature as data, plus how to sample it and how to call it wrongly.

    Attributes:
        name: registry name, also the function name in every backend.
        inputs: ordered array inputs.
        attributes: keyword attributes: scalars (:class:`Attr`) or arrays (:class:`Tensor`).
        outputs: output names with symbolic shapes; more than one means a tuple result.
        sample: ``sample(rng, sizes, dtype) -> Sample`` with bounded random values.
        extra_check: op-specific checks on the bound dims and attributes.
        errors: op-specific error cases built from a valid sample.
        doc: one-line summary with the equation reference.
        dims_from_attrs: output dims no input binds, taken from an attribute, e.g.
            (("B", "batch_size"),) for memory_init.
    """

    name: str
    inputs: tuple[Tensor, ...]
    attributes: tuple[Attr | Tensor, ...]
    outputs: tuple[tuple[str, tuple[str, ...]], ...]
    sample: Callable[[np.random.Generator, Sizes, str], Sample]
    extra_check: Callable[[Mapping[str, int], Mapping[str, Any]], None] | None = None
    errors: Callable[[Sample], Sequence[ErrorCase]] | None = None
    doc: str = ""
    dims_from_attrs: tuple[tuple[str, str], ...] = ()

    @property
    def differentiable(self) -> tuple[bool, ...]:
        return tuple(t.differentiable for t in self.inputs)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def multi_output(self) -> bool:
        return len(self.outputs) > 1

    def signature(self) -> str:
        """Human-readable signature for docs and the CLI."""
        ins = ", ".join(f"{t.name}: ({', '.join(t.shape)})" for t in self.inputs)
        ats = ", ".join(t.name for t in self.attributes)
        outs = ", ".join(f"{n}: ({', '.join(s)})" for n, s in self.outputs)
        return f"{self.name}({ins}; {ats}) -> {outs}"

    def output_shapes(
        self, bound: Mapping[str, int], attributes: Mapping[str, Any]
    ) -> tuple[tuple[int, ...], ...]:
        """The concrete shape of every output, from the dims and attributes ``validate``
        returned (``dims_from_attrs`` names the dims that come from attributes)."""
        dims = {**bound, **{d: int(attributes[a]) for d, a in self.dims_from_attrs}}
        return tuple(tuple(_eval_dim(e, dims) for e in shape) for _, shape in self.outputs)

    # ------------------------------------------------------------------ validation
    def validate(
        self,
        inputs: Sequence[Any],
        attributes: Mapping[str, Any],
        *,
        all_finite: Callable[[Any], bool] | None = None,
    ) -> tuple[dict[str, int], dict[str, Any]]:
        """Check a call; return the bound dims and the attributes with defaults filled.

        Args:
            inputs: the positional arrays.
            attributes: the keyword attributes.
            all_finite: ``f(array) -> bool``; when given, NaN/Inf inputs are rejected.

        Raises:
            MemcoreError: naming the argument, what was expected and what was received.
        """
        if len(inputs) != len(self.inputs):
            names = ", ".join(self.input_names)
            raise MemcoreError(
                f"`{self.name}` takes {len(self.inputs)} array inputs ({names}). "
                f"Received: {len(inputs)} inputs"
            )
        known = {a.name: a for a in self.attributes}
        unknown = sorted(set(attributes) - set(known))
        if unknown:
            raise MemcoreError(
                f"`{self.name}` got unknown attribute(s) {unknown}. "
                f"Available: {', '.join(known) or 'none'}"
            )
        filled: dict[str, Any] = {}
        arrays: list[tuple[Tensor, Any]] = list(zip(self.inputs, inputs))
        for a in self.attributes:
            if isinstance(a, Tensor):
                value = attributes.get(a.name)
                filled[a.name] = value
                if value is not None or not a.optional:
                    arrays.append((a, value))
                continue
            if a.name not in attributes:
                if a.required:
                    raise MemcoreError(
                        f"`{self.name}` requires attribute `{a.name}`. Received: no `{a.name}`"
                    )
                filled[a.name] = a.default
                continue
            value = attributes[a.name]
            if isinstance(value, np.generic):
                # A NumPy scalar becomes its Python value: np.float64(0.5) would otherwise
                # promote float32 inputs to float64 (NEP 50), and np.int64(3) is an int.
                value = value.item()
            if isinstance(value, bool) and bool not in a.types:
                ok = False
            else:
                ok = isinstance(value, a.types)
            if not ok:
                want = " or ".join(t.__name__ for t in a.types)
                raise MemcoreError(
                    f"`{a.name}` must be of type {want}. "
                    f"Received: {a.name}={value!r} ({type(value).__name__})"
                )
            if a.check is not None:
                a.check(value)
            filled[a.name] = value
        bound = self._check_arrays(arrays, all_finite)
        if self.extra_check is not None:
            self.extra_check(bound, filled)
        return bound, filled

    def _check_arrays(
        self, arrays: Sequence[tuple[Tensor, Any]], all_finite: Callable[[Any], bool] | None
    ) -> dict[str, int]:
        bound: dict[str, int] = {}
        float_ref: tuple[str, str] | None = None
        for spec, x in arrays:
            shape = getattr(x, "shape", None)
            if shape is None or not hasattr(x, "dtype"):
                raise MemcoreError(
                    f"`{spec.name}` must be an array of shape ({', '.join(spec.shape)}). "
                    f"Received: {type(x).__name__}"
                )
            shape = tuple(int(s) for s in shape)
            dt = dtype_name(x)
            if spec.kind == "bool" and dt != "bool":
                raise MemcoreError(
                    f"`{spec.name}` must have dtype bool. Received: {spec.name}.dtype={dt}"
                )
            if spec.kind == "float":
                if dt not in FLOAT_DTYPES:
                    raise MemcoreError(
                        f"`{spec.name}` must have a floating dtype ({', '.join(FLOAT_DTYPES)}). "
                        f"Received: {spec.name}.dtype={dt}"
                    )
                if float_ref is None:
                    float_ref = (spec.name, dt)
                elif dt != float_ref[1]:
                    raise MemcoreError(
                        f"`{spec.name}` must have the same dtype as `{float_ref[0]}` "
                        f"({float_ref[1]}). Received: {spec.name}.dtype={dt}"
                    )
            sym = "(" + ", ".join(spec.shape) + ")"
            if len(shape) != len(spec.shape):
                raise MemcoreError(
                    f"`{spec.name}` must have rank {len(spec.shape)}, shape {sym}. "
                    f"Received: {spec.name}.shape={shape}"
                )
            local = dict(bound)
            expected = []
            for expr, got in zip(spec.shape, shape):
                if _SYMBOL.match(expr) and expr not in local:
                    local[expr] = got
                expected.append(_eval_dim(expr, local))
            if tuple(expected) != shape:
                raise MemcoreError(
                    f"`{spec.name}` must have shape {sym} = {tuple(expected)}. "
                    f"Received: {spec.name}.shape={shape}"
                )
            bound = local
            if spec.kind == "float" and all_finite is not None and not all_finite(x):
                raise MemcoreError(
                    f"`{spec.name}` must be finite (no NaN or Inf). "
                    f"Received: {spec.name} with non-finite entries"
                )
        return bound


def check_positive_int(name: str) -> Callable[[Any], None]:
    """Attr check: an integer >= 1."""

    def check(value: Any) -> None:
        if value < 1:
            raise MemcoreError(f"`{name}` must be an integer >= 1. Received: {name}={value!r}")

    return check


def check_finite_real(name: str, low: float, high: float, closed_low: bool) -> Callable[[Any], None]:
    """Attr check: a finite real in (low, high] or [low, high]."""

    def check(value: Any) -> None:
        v = float(value)
        ok = math.isfinite(v) and (v >= low if closed_low else v > low) and v <= high
        if not ok:
            bracket = "[" if closed_low else "("
            raise MemcoreError(
                f"`{name}` must be a real number in {bracket}{low}, {high}]. Received: {name}={value!r}"
            )

    return check
