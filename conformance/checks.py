"""Per-op checks of a backend against the reference, generated from the op registry.

For one op, dtype and device, one drawn float64 example gives four checks:

* ``forward``: the backend's outputs against the reference's, the reference run in
  float64 on exactly the values the backend received (drawn in float64, cast down, read
  back), within the ``forward`` tolerance of the dtype;
* ``vjp``: the backend's gradients under random cotangents against the reference's
  hand-written backward under the same cotangents (``vjp`` tolerance);
* in float32 both tolerances are per array, a small multiple of the reference's own
  float32 error on the same inputs (:func:`~memcore.conformance.tolerances.reference_relative`);
* ``preserve``: outputs and gradients have the reference's shapes, the working dtype and
  the input's device;
* ``no_mutation``: every input, attribute array and cotangent is bit-identical after the calls.

``errors`` runs once per op and dtype: every ``memcore.ops.error_cases`` call must raise
``MemcoreError`` whose message matches the declared pattern.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from memcore import reference
from memcore.conformance.compare import Comparison, compare, failure
from memcore.conformance.tolerances import REF32_DTYPES, Tol, reference_relative, tolerance
from memcore.errors import MemcoreError
from memcore.ops import error_cases, get_op
from memcore.opspec import OpSpec, Sample, Sizes, dtype_name

__all__ = [
    "OP_CHECKS",
    "Outcome",
    "device_matches",
    "device_of",
    "host",
    "op_errors",
    "op_example",
    "reference_low",
    "to_backend",
]

OP_CHECKS = ("forward", "vjp", "preserve", "no_mutation", "errors")


@attrs.frozen
class Outcome:
    """One check on one example: passed or not, the comparisons made, and why it failed."""

    ok: bool
    comparisons: tuple[Comparison, ...] = ()
    message: str = ""


def _fail(message: str) -> Outcome:
    return Outcome(False, (), message)


def _from_comparisons(comps: Sequence[Comparison]) -> Outcome:
    bad = [c for c in comps if not c.ok]
    return Outcome(not bad, tuple(comps), "; ".join(c.describe() for c in bad[:3]))


# ------------------------------------------------------------------ conversions
def to_backend(backend: Any, x: Any, dtype: str, device: str) -> Any:
    """A NumPy value on the backend: float arrays cast to ``dtype``, others keep their dtype.

    Non-arrays (lists in error cases, scalars, None) pass through unchanged.
    """
    if isinstance(x, np.ndarray):
        if x.dtype.kind == "f":
            return backend.from_numpy(x, dtype=dtype, device=device)
        return backend.from_numpy(x, device=device)
    return x


def host(backend: Any, x: Any) -> np.ndarray:
    """A backend value (array or scalar) as a NumPy copy."""
    if isinstance(x, (bool, int, float, np.ndarray, np.generic)):
        return np.array(x)
    return np.array(backend.to_numpy(x))


def device_of(backend: Any, x: Any) -> str:
    """The device an array lives on: ``backend.device_of(x)`` when the backend has that
    hook, else ``str(x.device)``, else "cpu"."""
    hook = getattr(type(backend), "device_of", None)
    if hook is not None:
        return str(backend.device_of(x))
    dev = getattr(x, "device", None)
    return "cpu" if dev is None else str(dev)


def device_matches(actual: str, wanted: str) -> bool:
    """Whether a reported device name is the requested one ("TFRT_CPU_0" is a cpu; "cuda" is cuda:0)."""
    a, w = actual.lower(), wanted.lower()
    if w == "cpu":
        return "cpu" in a
    if w == "cuda":
        w = "cuda:0"
    if a == "cuda":
        a = "cuda:0"
    return a == w or a.replace("gpu", "cuda") == w


def _snapshot(backend: Any, values: Sequence[Any]) -> list[tuple[tuple[int, ...], bytes] | None]:
    out = []
    for v in values:
        if v is None or isinstance(v, (bool, int, float, list)):
            out.append(None)
            continue
        h = host(backend, v)
        out.append((h.shape, h.tobytes()))
    return out


def _converted(
    backend: Any, sample: Sample, dtype: str, device: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    ins = tuple(to_backend(backend, x, dtype, device) for x in sample.inputs)
    at = {k: to_backend(backend, v, dtype, device) for k, v in sample.attrs.items()}
    return ins, at


def _preserve(
    backend: Any,
    label: str,
    values: Sequence[Any],
    shapes: Sequence[tuple[int, ...]],
    dtype: str,
    device: str,
) -> list[str]:
    problems = []
    for i, (v, shape) in enumerate(zip(values, shapes)):
        if v is None:
            problems.append(f"{label}[{i}] is None")
            continue
        got_shape = tuple(int(s) for s in getattr(v, "shape", ()))
        if got_shape != tuple(shape):
            problems.append(f"{label}[{i}] shape {got_shape} != {tuple(shape)}")
        got_dtype = dtype_name(v)
        if got_dtype != dtype:
            problems.append(f"{label}[{i}] dtype {got_dtype} != {dtype}")
        dev = device_of(backend, v)
        if not device_matches(dev, device):
            problems.append(f"{label}[{i}] device {dev} != {device}")
    return problems


def _as_tuple(spec: OpSpec, out: Any) -> tuple[Any, ...] | None:
    if spec.multi_output:
        if isinstance(out, (tuple, list)) and len(out) == len(spec.outputs):
            return tuple(out)
        return None
    return (out,)


def reference_low(
    op: str, dtype: str, ins: Sequence[np.ndarray], attrs_: dict[str, Any], cts: Sequence[Any]
) -> tuple[tuple[Any, ...] | None, tuple[Any, ...] | None]:
    """The reference (numpy backend) run in ``dtype`` on the values the backend received:
    (outputs, gradients), each None when it cannot run there."""
    if dtype not in REF32_DTYPES:
        return None, None
    from memcore.backends.numpy import NumpyBackend

    be, spec = NumpyBackend(), get_op(op)
    try:
        i = tuple(to_backend(be, x, dtype, "cpu") for x in ins)
        a = {k: to_backend(be, v, dtype, "cpu") for k, v in attrs_.items()}
        c = [to_backend(be, x, dtype, "cpu") for x in cts]
        with np.errstate(all="ignore"):
            out, grads = be.vjp(op, i, a, tuple(c) if spec.multi_output else c[0])
    except Exception:  # noqa: BLE001 - no float32 reference: the table's tolerance applies
        return None, None
    grads = tuple(grads) if isinstance(grads, (tuple, list)) else (grads,)
    return _as_tuple(spec, out), grads


def _tol_for(low: Any, expected: np.ndarray, table: Tol) -> Tol:
    return table if low is None else reference_relative(low, expected, table)


# ------------------------------------------------------------------ one example
def op_example(
    backend: Any, op: str, dtype: str, device: str, sample: Sample, rng: np.random.Generator
) -> dict[str, Outcome]:
    """Run the forward, vjp, preserve and no_mutation checks on one float64 sample.

    Args:
        backend: the backend under test.
        op: registry name.
        dtype: working dtype of the backend.
        device: device name, one of ``backend.devices()``.
        sample: valid float64 NumPy inputs and attributes (from ``OpSpec.sample``).
        rng: draws the cotangents.
    """
    spec = get_op(op)
    out: dict[str, Outcome] = {}
    ins_f, at_f = _converted(backend, sample, dtype, device)
    # The reference sees exactly what the backend received: cast down, then read back.
    ref_in = tuple(host(backend, x).astype(np.float64) for x in ins_f)
    ref_at = dict(sample.attrs)
    ref_out, cache = reference.forward(op, *ref_in, **ref_at)
    ref_outs = _as_tuple(spec, ref_out)
    assert ref_outs is not None
    out_names = [n for n, _ in spec.outputs]
    before_f = _snapshot(backend, ins_f + tuple(at_f.values()))
    fwd_tol = tolerance(op, dtype, "forward")
    vjp_tol = tolerance(op, dtype, "vjp")
    preserve: list[str] = []
    cts64 = [rng.standard_normal(r.shape) for r in ref_outs]
    cts = [to_backend(backend, c, dtype, device) for c in cts64]
    ct_ref = [host(backend, c).astype(np.float64) for c in cts]
    ref_grads = reference.backward(op, cache, tuple(ct_ref) if spec.multi_output else ct_ref[0])
    low_outs, low_grads = reference_low(op, dtype, ref_in, ref_at, ct_ref)
    low_outs = low_outs or (None,) * len(ref_outs)
    low_grads = low_grads or (None,) * len(spec.inputs)

    try:
        result = backend.forward(op, *ins_f, **at_f)
    except Exception as exc:  # noqa: BLE001 - any exception is a failed check, reported
        out["forward"] = _fail(f"forward raised {type(exc).__name__}: {exc}")
    else:
        outs = _as_tuple(spec, result)
        if outs is None:
            out["forward"] = _fail(
                f"forward must return a tuple of {len(spec.outputs)} arrays; got {type(result).__name__}"
            )
        else:
            comps = []
            for name, o, r, low in zip(out_names, outs, ref_outs, low_outs):
                tol = _tol_for(low, r, fwd_tol)
                try:
                    comps.append(compare(name, host(backend, o), r, tol))
                except Exception as exc:  # noqa: BLE001
                    comps.append(failure(name, f"could not convert to NumPy: {exc}", tol))
            out["forward"] = _from_comparisons(comps)
            preserve += _preserve(
                backend, "forward out", outs, [r.shape for r in ref_outs], dtype, device
            )

    ins_v, at_v = _converted(backend, sample, dtype, device)
    before_v = _snapshot(backend, ins_v + tuple(at_v.values()) + tuple(cts))
    try:
        vout, grads = backend.vjp(op, ins_v, at_v, tuple(cts) if spec.multi_output else cts[0])
    except Exception as exc:  # noqa: BLE001
        out["vjp"] = _fail(f"vjp raised {type(exc).__name__}: {exc}")
    else:
        vouts = _as_tuple(spec, vout)
        comps = []
        if vouts is None:
            comps.append(
                failure(
                    "out", f"vjp must return the op's outputs; got {type(vout).__name__}", vjp_tol
                )
            )
        else:
            comps += [
                compare(f"out[{n}]", host(backend, o), r, _tol_for(low, r, vjp_tol))
                for n, o, r, low in zip(out_names, vouts, ref_outs, low_outs)
            ]
            preserve += _preserve(
                backend, "vjp out", vouts, [r.shape for r in ref_outs], dtype, device
            )
        grads = tuple(grads) if isinstance(grads, (tuple, list)) else (grads,)
        if len(grads) != len(spec.inputs):
            comps.append(
                failure("grads", f"{len(grads)} gradients for {len(spec.inputs)} inputs", vjp_tol)
            )
        else:
            for t, g, r, low in zip(spec.inputs, grads, ref_grads, low_grads):
                if t.differentiable:
                    actual = None if g is None else host(backend, g)
                    tol = _tol_for(low, r, vjp_tol)
                    comps.append(compare(f"grad[{t.name}]", actual, r, tol))
            diff = [(g, x.shape) for t, g, x in zip(spec.inputs, grads, ref_in) if t.differentiable]
            preserve += _preserve(
                backend, "grad", [g for g, _ in diff], [s for _, s in diff], dtype, device
            )
        out["vjp"] = _from_comparisons(comps)

    out["preserve"] = Outcome(not preserve, (), "; ".join(preserve[:4]))
    after_f = _snapshot(backend, ins_f + tuple(at_f.values()))
    after_v = _snapshot(backend, ins_v + tuple(at_v.values()) + tuple(cts))
    names = list(spec.input_names) + list(sample.attrs)
    changed = [f"forward changed `{n}`" for n, a, b in zip(names, before_f, after_f) if a != b]
    changed += [
        f"vjp changed `{n}`"
        for n, a, b in zip(names + ["cotangent"] * len(cts), before_v, after_v)
        if a != b
    ]
    out["no_mutation"] = Outcome(not changed, (), "; ".join(changed))
    return out


# ------------------------------------------------------------------ error inputs
def op_errors(
    backend: Any, op: str, dtype: str, device: str, sizes: Sizes | None = None
) -> Outcome:
    """Every declared error case of ``op`` must raise ``MemcoreError`` matching its pattern.

    The valid base sample is drawn with a fixed seed at ``sizes`` (default :class:`Sizes`).
    """
    spec = get_op(op)
    base = spec.sample(np.random.default_rng(0), sizes or Sizes(), "float64")
    problems = []
    cases = error_cases(spec, base)
    for case in cases:
        try:
            ins, at = _converted(backend, case.sample, dtype, device)
        except Exception as exc:  # noqa: BLE001 - a backend that rejects on conversion
            if isinstance(exc, MemcoreError) and re.search(case.match, str(exc)):
                continue
            problems.append(
                f"{case.label}: converting the inputs raised {type(exc).__name__}: {exc}"
            )
            continue
        try:
            backend.forward(op, *ins, **at)
        except MemcoreError as exc:
            if not re.search(case.match, str(exc)):
                problems.append(f"{case.label}: message {str(exc)!r} does not match {case.match!r}")
        except Exception as exc:  # noqa: BLE001
            problems.append(
                f"{case.label}: raised {type(exc).__name__} instead of MemcoreError: {exc}"
            )
        else:
            problems.append(f"{case.label}: did not raise")
    msg = "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
    return Outcome(not problems, (), msg if problems else f"{len(cases)} cases")
