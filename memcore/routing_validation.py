"""Entry validation of the routing drivers: every bad input is a ``MemcoreError`` naming the
argument, what it must be and what was received, raised before any computation."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from memcore.config import MemoryConfig, SABConfig
from memcore.errors import MemcoreError, expect
from memcore.opspec import dtype_name
from memcore.options import get_options
from memcore.reference._xp import all_finite, array_namespace
from memcore.routing_types import HEAD_PARAM, MEMFORMER_PARAMS, SAB_PARAMS, Loss

__all__ = [
    "ANY_ARRAY",
    "FORWARD_ONLY",
    "ArrayRules",
    "check_memformer",
    "check_sab",
    "reject_memformer_only",
]

# Passed as ``targets`` by the forward-only unrolls: skips the target checks.
FORWARD_ONLY = object()


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (bool, int, float))


def _all_true(mask: Any) -> bool:
    """True when every entry is; also True for a JAX tracer, whose values are unknown while
    tracing (the same rule as ``all_finite``, docs/semantics.md section 9)."""
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(mask, jax.core.Tracer):
        return True
    return bool(array_namespace(mask).all(mask))


@attrs.frozen
class ArrayRules:
    """What a driver's arrays are, as the checks need to know it (the routing analogue of the
    ``all_finite`` a backend hands to ``OpSpec.validate``).

    Attributes:
        kind: the arrays' name in messages ("an array", "a torch.Tensor").
        types: required types; empty accepts anything with ``shape`` and ``dtype``.
        all_finite: ``f(array) -> bool``, on the array's own device.
        all_true: ``f(bool array) -> bool``, on the array's own device.
    """

    kind: str = "an array"
    types: tuple[type, ...] = ()
    all_finite: Callable[[Any], bool] = all_finite
    all_true: Callable[[Any], bool] = _all_true

    def is_array(self, x: Any) -> bool:
        return isinstance(x, self.types) if self.types else _is_array(x)


ANY_ARRAY = ArrayRules()
"""Array API, NumPy, CuPy and JAX arrays (what the reference and JAX drivers take)."""


def _shape(
    name: str, x: Any, symbols: str, expected: Sequence[int | None], rules: ArrayRules
) -> tuple[int, ...]:
    """Check type, rank and the fixed dims (None = free); return the shape."""
    expect(rules.is_array(x), name, f"be {rules.kind}", f"{name}={type(x).__name__}")
    got = tuple(int(d) for d in x.shape)
    want = ", ".join("?" if e is None else str(e) for e in expected)
    ok = len(got) == len(expected) and all(e is None or e == g for e, g in zip(expected, got))
    expect(ok, name, f"have shape ({symbols}) = ({want})", f"{name}.shape={got}")
    return got


def _float(name: str, x: Any, dtype: str, rules: ArrayRules) -> None:
    expect(
        dtype_name(x) == dtype,
        name,
        f"have the float dtype of `xs` ({dtype})",
        f"{name}.dtype={dtype_name(x)}",
    )
    if get_options().check_finite:
        ok = rules.all_finite(x)
        expect(ok, name, "be finite (no NaN or Inf)", f"{name} has a non-finite entry")


def _bool(name: str, x: Any, symbols: str, expected: Sequence[int], rules: ArrayRules) -> None:
    _shape(name, x, symbols, expected, rules)
    expect(dtype_name(x) == "bool", name, "have dtype bool", f"{name}.dtype={dtype_name(x)}")


def _xs(
    xs: Any, rank: int, symbols: str, last: int | None, rules: ArrayRules
) -> tuple[tuple[int, ...], str]:
    shape = _shape("xs", xs, symbols, [None] * (rank - 1) + [last], rules)
    expect(shape[0] >= 1, "xs", "have T >= 1 time steps", f"xs.shape={shape}")
    # The per-step losses average over batch rows (and tokens): none may be empty.
    lead = symbols.split(", ")[1 : rank - 1]
    expect(
        all(d >= 1 for d in shape[1 : rank - 1]),
        "xs",
        f"have {', '.join(n + ' >= 1' for n in lead)}",
        f"xs.shape={shape}",
    )
    dtype = dtype_name(xs)
    expect(
        dtype in ("float16", "bfloat16", "float32", "float64"),
        "xs",
        "have a floating dtype",
        f"xs.dtype={dtype}",
    )
    _float("xs", xs, dtype, rules)
    return shape, dtype


def _params(params: Any, names: tuple[str, ...], kind: str) -> None:
    expect(
        isinstance(params, Mapping),
        "params",
        "be a dict of arrays",
        f"params={type(params).__name__}",
    )
    want = set(names) | ({HEAD_PARAM} if kind == "xent" else set())
    if kind == "any":  # a forward-only unroll ignores a loss head
        want |= {HEAD_PARAM} & set(params)
    missing = sorted(want - set(params))
    extra = sorted(set(params) - want)
    expect(not missing, "params", f"contain {', '.join(sorted(want))}", f"missing {missing}")
    why = " (head_w is used by loss kind 'xent' only)" if HEAD_PARAM in extra else ""
    expect(
        not extra, "params", f"contain only {', '.join(sorted(want))}{why}", f"unexpected {extra}"
    )


def _loss(loss: Any, steps: int) -> None:
    expect(
        isinstance(loss, Loss),
        "loss",
        "be a memcore.routing_types.Loss",
        f"loss={type(loss).__name__}",
    )
    if loss.weights is not None:
        n = len(loss.weights)
        expect(
            n == steps,
            "loss.weights",
            f"have one weight per step (T = {steps})",
            f"len(loss.weights)={n}",
        )


def _targets(
    targets: Any,
    loss: Loss,
    mse_shape: tuple[int, ...],
    symbols: str,
    classes: int | None,
    rules: ArrayRules,
) -> None:
    if targets is FORWARD_ONLY:
        return
    if loss.kind == "mse":
        _shape("targets", targets, symbols, mse_shape, rules)
        return
    xent_shape = mse_shape[:-1]
    _shape("targets", targets, symbols.rsplit(",", 1)[0], xent_shape, rules)
    dtype = dtype_name(targets)
    expect(
        dtype.startswith(("int", "uint")),
        "targets",
        "hold integer class ids for loss 'xent'",
        f"targets.dtype={dtype}",
    )
    ok = rules.all_true((targets >= 0) & (targets < classes))
    expect(ok, "targets", f"hold class ids in [0, C) = [0, {classes})", "an id outside that range")


def _param(
    params: Mapping[str, Any],
    name: str,
    symbols: str,
    expected: Sequence[int | None],
    dtype: str,
    rules: ArrayRules,
) -> tuple[int, ...]:
    shape = _shape(f"params['{name}']", params[name], symbols, expected, rules)
    _float(f"params['{name}']", params[name], dtype, rules)
    return shape


def check_memformer(
    params: Any,
    xs: Any,
    state0: Any,
    targets: Any,
    config: Any,
    loss: Any,
    resets: Any,
    token_mask: Any,
    truncate_every: Any,
    rules: ArrayRules = ANY_ARRAY,
    memory_arg: str = "state0",
) -> None:
    """Validate a Memformer routing call (shapes from ``docs/semantics.md``); ``rules`` say
    what the driver's arrays are (:class:`ArrayRules`), ``memory_arg`` is the initial
    memory's argument name in the driver's signature (``state0`` in ``bptt``, ``M0`` in
    ``mrbp``), so messages name what the caller passed."""
    expect(
        isinstance(config, MemoryConfig),
        "config",
        "be a memcore.MemoryConfig",
        f"config={type(config).__name__}",
    )
    expect(
        isinstance(loss, Loss),
        "loss",
        "be a memcore.routing_types.Loss",
        f"loss={type(loss).__name__}",
    )
    k, d = config.slots, config.dim
    (t, b, l, _), dtype = _xs(xs, 4, "T, B, L, D", d, rules)
    _loss(loss, t)
    _shape(memory_arg, state0, "B, K, D", (b, k, d), rules)
    _float(memory_arg, state0, dtype, rules)
    _params(params, MEMFORMER_PARAMS, loss.kind if targets is not FORWARD_ONLY else "any")
    for name in MEMFORMER_PARAMS[:-1]:
        _param(params, name, "D, D", (d, d), dtype, rules)
    _param(params, "v_bias", "K, D", (k, d), dtype, rules)
    classes = None
    if loss.kind == "xent":
        classes = _param(params, HEAD_PARAM, "D, C", (d, None), dtype, rules)[1]
        expect(
            classes >= 1,
            "params['head_w']",
            "have C >= 1 classes",
            f"shape={params[HEAD_PARAM].shape}",
        )
    _targets(targets, loss, (t, b, l, d), "T, B, L, D", classes, rules)
    if loss.kind == "mse" and targets is not FORWARD_ONLY:
        _float("targets", targets, dtype, rules)
    if resets is not None:
        _bool("resets", resets, "T, B", (t, b), rules)
    if token_mask is not None:
        _bool("token_mask", token_mask, "T, B, L", (t, b, l), rules)
    if truncate_every is not None:
        ok = (
            isinstance(truncate_every, int)
            and not isinstance(truncate_every, bool)
            and truncate_every >= 1
        )
        expect(
            ok, "truncate_every", "be None or an integer >= 1", f"truncate_every={truncate_every!r}"
        )


def check_sab(
    params: Any,
    xs: Any,
    state0: Any,
    targets: Any,
    config: Any,
    loss: Any,
    rules: ArrayRules = ANY_ARRAY,
) -> None:
    """Validate a SAB routing call (shapes from ``docs/semantics.md``); ``rules`` as in
    :func:`check_memformer`."""
    expect(
        isinstance(config, SABConfig),
        "config",
        "be a memcore.SABConfig",
        f"config={type(config).__name__}",
    )
    expect(
        isinstance(loss, Loss),
        "loss",
        "be a memcore.routing_types.Loss",
        f"loss={type(loss).__name__}",
    )
    # SABConfig validates itself, but attrs.evolve(..., k_att=0) with validators off would not.
    for name in ("k_top", "k_att", "k_trunc"):
        v = getattr(config, name)
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
        expect(ok, f"config.{name}", "be an integer >= 1", f"{name}={v!r}")
    (t, b, i), dtype = _xs(xs, 3, "T, B, I", None, rules)
    _loss(loss, t)
    _params(params, SAB_PARAMS, loss.kind if targets is not FORWARD_ONLY else "any")
    hd, a = _param(params, "w1", "Hd, A", (None, None), dtype, rules)
    expect(hd >= 1, "params['w1']", "have a hidden width Hd >= 1", f"params['w1'].shape={(hd, a)}")
    ok = isinstance(state0, (tuple, list)) and len(state0) == 2
    expect(ok, "state0", "be a pair (h0, c0)", f"state0={type(state0).__name__}")
    _shape("state0[0]", state0[0], "B, Hd", (b, hd), rules)
    _shape("state0[1]", state0[1], "B, Hd", (b, hd), rules)
    _float("state0[0]", state0[0], dtype, rules)
    _float("state0[1]", state0[1], dtype, rules)
    _param(params, "lstm_w", "I+Hd, 4*Hd", (i + hd, 4 * hd), dtype, rules)
    _param(params, "lstm_b", "4*Hd", (4 * hd,), dtype, rules)
    _param(params, "w2", "Hd, A", (hd, a), dtype, rules)
    _param(params, "w3", "A", (a,), dtype, rules)
    o = _param(params, "v1", "Hd, O", (hd, None), dtype, rules)[1]
    _param(params, "v2", "Hd, O", (hd, o), dtype, rules)
    _param(params, "b_y", "O", (o,), dtype, rules)
    classes = None
    if loss.kind == "xent":
        classes = _param(params, HEAD_PARAM, "O, C", (o, None), dtype, rules)[1]
        expect(
            classes >= 1,
            "params['head_w']",
            "have C >= 1 classes",
            f"shape={params[HEAD_PARAM].shape}",
        )
    _targets(targets, loss, (t, b, o), "T, B, O", classes, rules)
    if loss.kind == "mse" and targets is not FORWARD_ONLY:
        _float("targets", targets, dtype, rules)


def reject_memformer_only(step: str, **given: Any) -> None:
    """bptt('sab') takes no resets, token_mask or truncate_every (they are Memformer's)."""
    for name, value in given.items():
        if value is not None:
            raise MemcoreError(
                f"`{name}` must be None for step {step!r} (it is Memformer's). "
                f"Received: {name} of type {type(value).__name__}"
            )
