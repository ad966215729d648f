"""The op registry: every memory op of memcore, declared once.

Tests, backends, the conformance suite, the docs and the CLI iterate over :data:`OPS`.
Equations are in ``docs/semantics.md``; the NumPy reference is their executable form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np

from memcore.config import check_eps, check_tau
from memcore.errors import MemcoreError
from memcore.opspec import (
    Attr,
    ErrorCase,
    OpSpec,
    Sample,
    Sizes,
    Tensor,
    check_positive_int,
)

__all__ = ["OPS", "error_cases", "get_op"]

_INT = (int,)
_REAL = (int, float)
_BOOL = (bool,)


# --------------------------------------------------------------------------- checks
def _heads_divide(bound: Mapping[str, int], at: Mapping[str, Any], first: str = "x") -> None:
    d, h = bound["D"], at["num_heads"]
    if d < 1:
        # dh = 0 leaves the 1/sqrt(dh) scale undefined.
        raise MemcoreError(f"`{first}` must have a width D >= 1. Received: D={d}")
    if d % h != 0:
        raise MemcoreError(
            f"`num_heads` must divide the width D = {d}. Received: num_heads={h}, D={d}"
        )


def _slot_check(bound: Mapping[str, int], at: Mapping[str, Any]) -> None:
    _heads_divide(bound, at, first="memory")


def _read_check(bound: Mapping[str, int], at: Mapping[str, Any]) -> None:
    _heads_divide(bound, at)
    if bound["K"] < 1:
        # A softmax over zero slots is undefined (the write keeps its self entry, the read
        # has none).
        raise MemcoreError(f"`memory` must have K >= 1 slots. Received: K={bound['K']}")


def _lstm_width(bound: Mapping[str, int], at: Mapping[str, Any]) -> None:
    if bound["Hd"] < 1:
        raise MemcoreError(f"`h` must have a hidden width >= 1. Received: Hd={bound['Hd']}")


_num_heads = Attr("num_heads", _INT, check=check_positive_int("num_heads"))
_tau = Attr("tau", _REAL, default=0.25, check=check_tau)
_token_mask = Tensor("token_mask", ("B", "L"), differentiable=False, kind="bool", optional=True)
_k_top = Attr("k_top", _INT, check=check_positive_int("k_top"))
_eps = Attr("eps", _REAL, default=1e-7, check=check_eps)
_threshold_grad = Attr("threshold_grad", _BOOL, default=False)
_block_score_grad = Attr("block_score_grad", _BOOL, default=False)


# --------------------------------------------------------------------------- samplers
def _arr(rng: np.random.Generator, shape: tuple[int, ...], dtype: str, scale: float = 1.0):
    # Bounded values: uniform in (-scale, scale), drawn in float64 then cast down.
    return (rng.uniform(-1.0, 1.0, size=shape) * scale).astype(dtype)


def _proj(rng, d_in, d_out, dtype):
    return _arr(rng, (d_in, d_out), dtype, scale=np.sqrt(3.0 / d_in))


def _mask(rng, shape):
    return rng.random(shape) < 0.7


def _s_memory_read(rng, z: Sizes, dtype) -> Sample:
    D = z.D
    ins = (_arr(rng, (z.B, z.L, D), dtype), _arr(rng, (z.B, z.K, D), dtype))
    ins += tuple(_proj(rng, D, D, dtype) for _ in range(4))
    return Sample(ins, {"num_heads": z.H})


def _s_slot_attention(rng, z: Sizes, dtype) -> Sample:
    D = z.D
    ins = (_arr(rng, (z.B, z.K, D), dtype), _arr(rng, (z.B, z.L, D), dtype))
    ins += tuple(_proj(rng, D, D, dtype) for _ in range(3))
    return Sample(ins, {"num_heads": z.H, "tau": 0.5, "token_mask": _mask(rng, (z.B, z.L))})


def _s_bmn(rng, z: Sizes, dtype) -> Sample:
    return Sample((_arr(rng, (z.B, z.K, z.D), dtype), _arr(rng, (z.K, z.D), dtype)))


def _s_memory_write(rng, z: Sizes, dtype) -> Sample:
    base = _s_slot_attention(rng, z, dtype)
    return Sample(base.inputs + (_arr(rng, (z.K, z.D), dtype),), base.attrs)


def _s_memory_init(rng, z: Sizes, dtype) -> Sample:
    return Sample((_arr(rng, (z.K, z.D), dtype),), {"batch_size": z.B})


def _s_memory_reset(rng, z: Sizes, dtype) -> Sample:
    ins = (_arr(rng, (z.B, z.K, z.D), dtype), _arr(rng, (z.K, z.D), dtype))
    return Sample(ins, {"reset": rng.random(z.B) < 0.5})


def _s_lstm_cell(rng, z: Sizes, dtype) -> Sample:
    ins = (
        _arr(rng, (z.B, z.I), dtype),
        _arr(rng, (z.B, z.Hd), dtype),
        _arr(rng, (z.B, z.Hd), dtype),
        _proj(rng, z.I + z.Hd, 4 * z.Hd, dtype),
        _arr(rng, (4 * z.Hd,), dtype, 0.5),
    )
    return Sample(ins)


def _scorer(rng, z: Sizes, dtype):
    return (
        _proj(rng, z.Hd, z.A, dtype),
        _proj(rng, z.Hd, z.A, dtype),
        _arr(rng, (z.A,), dtype, scale=1.5),
    )


def _s_sab_scores(rng, z: Sizes, dtype) -> Sample:
    ins = (_arr(rng, (z.B, z.Hd), dtype), _arr(rng, (z.B, z.N, z.Hd), dtype))
    return Sample(ins + _scorer(rng, z, dtype))


def _s_sparsify(rng, z: Sizes, dtype) -> Sample:
    return Sample((_arr(rng, (z.B, z.N), dtype),), {"k_top": max(1, z.N // 2)})


def _s_sparse_retrieve(rng, z: Sizes, dtype) -> Sample:
    base = _s_sab_scores(rng, z, dtype)
    return Sample(base.inputs, {"k_top": max(1, z.N // 2)})


# --------------------------------------------------------------------------- error cases
def _with_attr(s: Sample, **changes: Any) -> Sample:
    return Sample(s.inputs, {**s.attrs, **changes})


def _errs_heads(s: Sample) -> list[ErrorCase]:
    d = s.inputs[0].shape[-1]
    return [ErrorCase("num_heads does not divide D", _with_attr(s, num_heads=d + 1), r"`num_heads` must")]


def _zero_width(s: Sample, op: str) -> ErrorCase:
    # Cut every axis the spec names D to length 0 (v_bias (K, D) keeps its K axis).
    def cut(x: Any, t: Tensor) -> Any:
        return x[tuple(slice(0, 0) if d == "D" else slice(None) for d in t.shape)]

    ins = tuple(cut(x, t) for x, t in zip(s.inputs, OPS[op].inputs))
    return ErrorCase("D = 0", Sample(ins, s.attrs), r"must have a width D >= 1")


def _errs_read(s: Sample) -> list[ErrorCase]:
    memory = s.inputs[1][:, :0]
    ins = (s.inputs[0], memory) + tuple(s.inputs[2:])
    return _errs_heads(s) + [
        _zero_width(s, "memory_read"),
        ErrorCase("memory with K = 0", Sample(ins, s.attrs), r"`memory` must have K >= 1 slots"),
    ]


def _errs_slot(s: Sample) -> list[ErrorCase]:
    op = "memory_write" if len(s.inputs) == 6 else "slot_attention"
    out = _errs_heads(s) + [_zero_width(s, op)]
    out += [
        ErrorCase("tau = 0", _with_attr(s, tau=0.0), r"`tau` must be a real number in \(0, 1\]"),
        ErrorCase("tau > 1", _with_attr(s, tau=1.5), r"`tau` must be a real number in \(0, 1\]"),
        ErrorCase("tau = nan", _with_attr(s, tau=float("nan")), r"`tau` must"),
        ErrorCase("tau subnormal", _with_attr(s, tau=5e-324), r"`tau` must be .* at least 2\*\*-126"),
        ErrorCase("tau below 2**-126", _with_attr(s, tau=1e-39), r"`tau` must be .* at least 2\*\*-126"),
    ]
    return out


def _errs_init(s: Sample) -> list[ErrorCase]:
    return [ErrorCase("batch_size = 0", _with_attr(s, batch_size=0), r"`batch_size` must")]


def _errs_sparsify(s: Sample) -> list[ErrorCase]:
    return [
        ErrorCase("k_top = 0", _with_attr(s, k_top=0), r"`k_top` must be an integer >= 1"),
        ErrorCase("eps < 0", _with_attr(s, eps=-1.0), r"`eps` must"),
        ErrorCase("threshold_grad not bool", _with_attr(s, threshold_grad=1), r"`threshold_grad` must"),
    ]


def error_cases(spec: OpSpec, sample: Sample) -> list[ErrorCase]:
    """Every way to call ``spec`` wrongly, derived from a valid NumPy sample.

    Generic cases come from the declared inputs (wrong rank, mismatched batch, integer or
    non-bool dtypes, NaN/Inf, not an array); op-specific ones from ``spec.errors``.
    """
    out: list[ErrorCase] = []
    ins = list(sample.inputs)
    for i, t in enumerate(spec.inputs):
        x = ins[i]

        def repl(v: Any, i: int = i) -> tuple[Any, ...]:
            return tuple(v if j == i else ins[j] for j in range(len(ins)))

        out.append(ErrorCase(f"{t.name} rank", Sample(repl(x[None]), sample.attrs), rf"`{t.name}` must have rank"))
        out.append(ErrorCase(f"{t.name} not an array", Sample(repl(x.tolist()), sample.attrs), rf"`{t.name}` must be an array"))
        if t.kind == "float":
            out.append(ErrorCase(f"{t.name} integer", Sample(repl(x.astype(np.int64)), sample.attrs), rf"`{t.name}` must have a floating dtype"))
            if x.size:
                for bad in (np.nan, np.inf):
                    y = x.copy()
                    y.flat[0] = bad
                    out.append(ErrorCase(f"{t.name} {bad}", Sample(repl(y), sample.attrs), rf"`{t.name}` must be finite"))
        if i > 0 and t.shape and t.shape[0] == "B":
            y = np.concatenate([x, x[:1]], axis=0)
            out.append(ErrorCase(f"{t.name} batch mismatch", Sample(repl(y), sample.attrs), rf"`{t.name}` must have shape"))
        # Only a width an earlier input already fixed can mismatch (h binds Hd in lstm_cell).
        bound_before = {d for u in spec.inputs[:i] for d in u.shape}
        width = t.shape[-1] if t.shape else None
        if width in ("D", "Hd") and width in bound_before and x.shape[-1] > 0:
            y = x[..., :-1]
            out.append(ErrorCase(f"{t.name} width mismatch", Sample(repl(y), sample.attrs), rf"`{t.name}` must have shape"))
    for a in spec.attributes:
        if isinstance(a, Tensor) and sample.attrs.get(a.name) is not None:
            m = np.asarray(sample.attrs[a.name])
            out.append(ErrorCase(f"{a.name} not bool", _with_attr(sample, **{a.name: m.astype(np.float64)}), rf"`{a.name}` must have dtype bool"))
            out.append(ErrorCase(f"{a.name} shape", _with_attr(sample, **{a.name: m[..., :0]}), rf"`{a.name}` must have shape"))
    out.append(ErrorCase("unknown attribute", _with_attr(sample, bogus=1), r"unknown attribute"))
    if spec.errors is not None:
        out.extend(spec.errors(sample))
    return out


# --------------------------------------------------------------------------- the table
_x = Tensor("x", ("B", "L", "D"))
_memory = Tensor("memory", ("B", "K", "D"))
_v_bias = Tensor("v_bias", ("K", "D"))


def _w(name: str) -> Tensor:
    return Tensor(name, ("D", "D"))


_scorer_ins = (Tensor("w1", ("Hd", "A")), Tensor("w2", ("Hd", "A")), Tensor("w3", ("A",)))

_TABLE: Sequence[OpSpec] = (
    OpSpec(
        "memory_read",
        (_x, _memory, _w("wq"), _w("wk"), _w("wv"), _w("wo")),
        (_num_heads,),
        (("out", ("B", "L", "D")),),
        _s_memory_read,
        extra_check=_read_check,
        errors=_errs_read,
        doc="Multi-head cross-attention from tokens to memory slots (Memformer Eq. 1-3).",
    ),
    OpSpec(
        "slot_attention",
        (_memory, _x, _w("wq"), _w("wk"), _w("wv")),
        (_num_heads, _tau, _token_mask),
        (("out", ("B", "K", "D")),),
        _s_slot_attention,
        extra_check=_slot_check,
        errors=_errs_slot,
        doc="Each slot attends to [itself; tokens], logits / (sqrt(dh) tau) (Memformer Eq. 4-8).",
    ),
    OpSpec(
        "bmn",
        (Tensor("m", ("B", "K", "D")), _v_bias),
        (),
        (("out", ("B", "K", "D")),),
        _s_bmn,
        doc="Biased Memory Normalization: (m + v_bias) / max(||m + v_bias||, 1e-12).",
    ),
    OpSpec(
        "memory_write",
        (_memory, _x, _w("wq"), _w("wk"), _w("wv"), _v_bias),
        (_num_heads, _tau, _token_mask),
        (("out", ("B", "K", "D")),),
        _s_memory_write,
        extra_check=_slot_check,
        errors=_errs_slot,
        doc="bmn(slot_attention(memory, x), v_bias).",
    ),
    OpSpec(
        "memory_init",
        (_v_bias,),
        (Attr("batch_size", _INT, check=check_positive_int("batch_size")),),
        (("out", ("B", "K", "D")),),
        _s_memory_init,
        errors=_errs_init,
        doc="normalize(v_bias) broadcast over the batch.",
        dims_from_attrs=(("B", "batch_size"),),
    ),
    OpSpec(
        "memory_reset",
        (_memory, _v_bias),
        (Tensor("reset", ("B",), differentiable=False, kind="bool"),),
        (("out", ("B", "K", "D")),),
        _s_memory_reset,
        doc="Rows flagged in reset are replaced by the initial memory normalize(v_bias).",
    ),
    OpSpec(
        "lstm_cell",
        (
            Tensor("x", ("B", "I")),
            Tensor("h", ("B", "Hd")),
            Tensor("c", ("B", "Hd")),
            Tensor("w", ("I+Hd", "4*Hd")),
            Tensor("b", ("4*Hd",)),
        ),
        (),
        (("h_hat", ("B", "Hd")), ("c", ("B", "Hd"))),
        _s_lstm_cell,
        extra_check=_lstm_width,
        doc="LSTM cell, gates [x, h] w + b in the order (i, f, g, o).",
    ),
    OpSpec(
        "sab_scores",
        (Tensor("h_hat", ("B", "Hd")), Tensor("memories", ("B", "N", "Hd"))) + _scorer_ins,
        (),
        (("scores", ("B", "N")),),
        _s_sab_scores,
        doc="a_i = w3 . tanh(m_i w1 + h_hat w2) (SAB Alg. 1).",
    ),
    OpSpec(
        "sparsify",
        (Tensor("scores", ("B", "N")),),
        (_k_top, _eps, _threshold_grad),
        (("weights", ("B", "N")),),
        _s_sparsify,
        errors=_errs_sparsify,
        doc="w = relu(a - tau_row) / (sum + eps), tau_row the min(k_top+1, N)-th largest.",
    ),
    OpSpec(
        "sparse_retrieve",
        (Tensor("h_hat", ("B", "Hd")), Tensor("memories", ("B", "N", "Hd"))) + _scorer_ins,
        (_k_top, _eps, _threshold_grad, _block_score_grad),
        (("s", ("B", "Hd")), ("weights", ("B", "N"))),
        _s_sparse_retrieve,
        errors=_errs_sparsify,
        doc="s = sum_i w_i m_i with w = sparsify(sab_scores(h_hat, memories)).",
    ),
)

OPS: Mapping[str, OpSpec] = {spec.name: spec for spec in _TABLE}


def get_op(name: str) -> OpSpec:
    """The spec of op ``name``; an unknown name lists the registered ones."""
    try:
        return OPS[name]
    except KeyError:
        raise MemcoreError(f"Unknown op {name!r}. Available: {', '.join(OPS)}") from None


assert all(attrs.has(type(s)) for s in _TABLE)
