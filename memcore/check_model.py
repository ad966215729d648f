"""Check your own model: MRBP's gradients against BPTT's on your step, in float64.

:func:`check_mrbp` runs a user's ``step`` twice in float64, once through the library's
MRBP driver and once through plain BPTT (autograd through a Python loop of the same
step), and compares the loss, the final memory and every parameter's gradient. With a
torch and a JAX version of the same model it also compares the two frameworks' MRBP
gradients. The report has the conformance suite's format (:mod:`memcore.conformance.report`):
one row per (comparison, quantity), a float64 column, and each row's max abs and max rel
error.

``memcore verify --model pkg.mod:factory`` runs the same check from the command line
(:mod:`memcore.verify_model`); ``factory()`` returns a :class:`ModelCheck` (or a dict of
:func:`check_mrbp`'s arguments).

Nothing here imports torch or jax until a check runs.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import numpy as np

from memcore.errors import MemcoreError

__all__ = [
    "MRBPReport",
    "ModelCheck",
    "Run",
    "check_mrbp",
    "window_start",
]

FRAMEWORKS = ("torch", "jax")


@attrs.frozen
class Run:
    """One driver's result on one model, as float64 NumPy (what the checks compare).

    Attributes:
        loss: the rollout's total loss L = sum_t loss_t.
        grads: dL/dparam per parameter name.
        values: the parameters the run used, per name (the cross-framework check needs them).
        memory: the final memory's leaves, in flattening order.
    """

    loss: float
    grads: Mapping[str, np.ndarray]
    values: Mapping[str, np.ndarray]
    memory: list[np.ndarray]


def window_start(t: int, truncate_every: int | None, horizon: int | None) -> int:
    """w_t: the first segment loss t back-propagates through (docs/semantics.md R.4b).

    w_t = max(t - h + 1, the last cut <= t), 0 when neither applies; a cut is a segment
    t > 0 with t % truncate_every == 0. The memory entering segment w_t is a constant for
    loss t, except M_0 (w_t = 0), which is ``memory0`` itself.
    """
    cut = (t // truncate_every) * truncate_every if truncate_every else 0
    return max(cut, t - horizon + 1 if horizon else 0, 0)


@attrs.frozen(kw_only=True)
class ModelCheck:
    """What ``memcore verify --model pkg.mod:factory`` expects ``factory()`` to return.

    The fields are :func:`check_mrbp`'s arguments: either ``step, memory0, segments``
    (``params`` for JAX or a function step, ``framework``), or ``torch=`` and ``jax=``
    tuples for the torch-vs-JAX form. A plain dict with the same keys works too.
    """

    step: Any = None
    memory0: Any = None
    segments: Any = None
    params: Any = None
    framework: str = "torch"
    truncate_every: int | None = None
    horizon: int | None = None
    torch: Any = None
    jax: Any = None
    param_map: Mapping[str, Any] | None = None
    rtol: float = 1e-10
    atol: float | None = None


@attrs.frozen
class MRBPReport:
    """The outcome of :func:`check_mrbp`.

    Attributes:
        passed: every row within tolerance.
        results: one :class:`~memcore.conformance.result.CheckResult` per row (op = the
            comparison, e.g. "torch:mrbp-vs-bptt"; check = "loss", "memory[i]" or
            "grad[name]"), each with its worst :class:`~memcore.conformance.compare.Comparison`.
        text: the printed report: header, table, every row's max abs / max rel error.
    """

    passed: bool
    results: tuple[Any, ...]
    text: str

    def errors(self) -> dict[str, tuple[float, float]]:
        """(max abs err, max rel err) per row, keyed "op/check"."""
        none = (math.inf, math.inf)
        return {
            f"{r.op}/{r.check}": (r.worst.max_abs, r.worst.max_rel) if r.worst else none
            for r in self.results
        }

    @property
    def max_rel(self) -> float:
        """The largest relative error over every row."""
        return max((rel for _, rel in self.errors().values()), default=0.0)

    def to_json(self) -> dict[str, Any]:
        """Environment, ``ok`` and every row as the conformance JSON report writes them."""
        from memcore.conformance import report

        return {
            **report.environment(),
            "ok": self.passed,
            "results": [report.result_record(r) for r in self.results],
        }

    def __str__(self) -> str:
        return self.text


def _tol(rtol: Any, atol: Any) -> Any:
    from memcore.conformance.tolerances import Tol

    Tol(rtol=rtol, atol=0.0)  # validates rtol with the suite's message
    return Tol(rtol=rtol, atol=rtol / 100 if atol is None else atol)


def _rows(framework: str, device: str, op: str, comps: list[Any]) -> list[Any]:
    from memcore.conformance.result import CheckResult

    return [
        CheckResult(
            # The table's failure notes print "FAIL  <id>: <check>: <errors>".
            id=op,
            backend=framework,
            device=device,
            dtype="float64",
            op=op,
            check=c.name,
            status="passed" if c.ok else "failed",
            examples=1,
            worst=c,
        )
        for c in comps
    ]


def _memory_comps(actual: Run, expected: Run, tol: Any) -> list[Any]:
    from memcore.conformance.compare import compare, failure

    a, e = actual.memory, expected.memory
    if len(a) != len(e):
        return [failure("memory", f"{len(a)} memory leaves != expected {len(e)}", tol)]
    many = len(e) > 1
    return [
        compare(f"memory[{i}]" if many else "memory", x, y, tol)
        for i, (x, y) in enumerate(zip(a, e))
    ]


def _mrbp_vs_bptt(bptt: Run, mrbp: Run, tol: Any) -> list[Any]:
    """Loss, final memory and every gradient: MRBP (actual) against BPTT (expected)."""
    from memcore.conformance.compare import compare, failure

    comps = [compare("loss", mrbp.loss, bptt.loss, tol), *_memory_comps(mrbp, bptt, tol)]
    for name, g in bptt.grads.items():
        comps.append(compare(f"grad[{name}]", mrbp.grads.get(name), g, tol))
    for name in set(mrbp.grads) - set(bptt.grads):
        comps.append(failure(f"grad[{name}]", "MRBP has a gradient BPTT does not", tol))
    return comps


def _mapping(param_map: Mapping[str, Any] | None, torch_run: Run) -> dict[str, tuple[str, Any]]:
    out = {n: (n, None) for n in torch_run.grads}
    if param_map is None:
        return out
    if not isinstance(param_map, Mapping):
        raise MemcoreError(
            "`param_map` must be a dict {torch name: JAX name or (JAX name, fn)}. "
            f"Received: {type(param_map).__name__}"
        )
    for t, target in param_map.items():
        if isinstance(target, str):
            out[t] = (target, None)
        elif isinstance(target, tuple) and len(target) == 2 and callable(target[1]):
            out[t] = (str(target[0]), target[1])
        else:
            raise MemcoreError(
                "`param_map` values must be a JAX parameter name or (name, fn) with fn mapping "
                "the torch array to the JAX layout (e.g. np.transpose). "
                f"Received: param_map[{t!r}]={target!r}"
            )
    return out


def _torch_vs_jax(t: Run, j: Run, param_map: Mapping[str, Any] | None, tol: Any) -> list[Any]:
    """JAX's MRBP results (actual) against torch's (expected), parameters matched by name.

    Unmatched names, or weights that differ between the two models, are the only rows
    reported then: with other weights every gradient differs, and saying so is the finding.
    """
    from memcore.conformance.compare import compare, failure

    mapping = _mapping(param_map, t)
    problems, pairs = [], []
    for tname, (jname, fn) in mapping.items():
        label = f"grad[{tname}]" if tname == jname else f"grad[{tname} -> {jname}]"
        layout = fn if fn is not None else (lambda x: x)
        if tname not in t.grads:
            why = f"no torch parameter {tname!r} (torch has {sorted(t.grads)})"
        elif jname not in j.grads:
            why = f"no JAX parameter {jname!r} (JAX has {sorted(j.grads)}); pass param_map"
        else:
            value = compare("value", j.values[jname], np.asarray(layout(t.values[tname])), tol)
            why = "" if value.ok else (
                f"parameter values differ ({value.reason or f'max abs err {value.max_abs:.1e}'}): "
                "start both models from the same weights"
            )
        if why:
            problems.append(failure(label, why, tol))
        else:
            pairs.append((label, jname, tname, layout))
    for jname in sorted(set(j.grads) - {v[0] for v in mapping.values()}):
        why = "JAX parameter with no torch counterpart in param_map"
        problems.append(failure(f"grad[{jname}]", why, tol))
    if problems:
        return problems
    comps = [compare("loss", j.loss, t.loss, tol), *_memory_comps(j, t, tol)]
    for label, jname, tname, layout in pairs:
        comps.append(compare(label, j.grads[jname], np.asarray(layout(t.grads[tname])), tol))
    return comps


def _version(module: str) -> str:
    return getattr(sys.modules.get(module), "__version__", "")


def _abs_rel(r: Any) -> str:
    w = r.worst
    return "" if w is None or w.reason else f"abs {w.max_abs:.1e} rel {w.max_rel:.1e}"


def _report(results: list[Any], header: str) -> MRBPReport:
    from memcore.conformance import report

    passed = bool(results) and not any(r.failed for r in results)
    counts = report.summary(results)
    lines = [header, report.format_table(results, _abs_rel)]
    lines.append("summary: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    lines.append("check_mrbp: " + ("PASSED" if passed else "FAILED"))
    return MRBPReport(passed, tuple(results), "\n".join(lines))


def _unpack(value: Any, names: tuple[str, ...], required: int, label: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        unknown = set(value) - set(names)
        if unknown or not set(names[:required]) <= set(value):
            raise MemcoreError(
                f"`{label}` must be a dict with keys {', '.join(names[:required])} (optional "
                f"{', '.join(names[required:]) or 'none'}). Received keys: {sorted(value)}"
            )
        return dict(value)
    if isinstance(value, (tuple, list)) and required <= len(value) <= len(names):
        return dict(zip(names, value))
    raise MemcoreError(
        f"`{label}` must be a tuple ({', '.join(names[:required])}"
        f"{''.join(f'[, {n}]' for n in names[required:])}) or a dict of them. "
        f"Received: {type(value).__name__}"
        + (f" of length {len(value)}" if isinstance(value, (tuple, list)) else "")
    )


def _run(framework: str, args: dict[str, Any], cuts: dict[str, int | None]) -> tuple[Run, Run, str]:
    if framework == "torch":
        from memcore.backends.torch.check_mrbp import run_both

        a = args
        return run_both(a["step"], a["memory0"], a["segments"], params=a.get("params"), **cuts)
    from memcore.backends.jax.check_mrbp import run_both as run_jax

    return run_jax(args["step"], args.get("params"), args["memory0"], args["segments"], **cuts)


def check_mrbp(
    step: Callable | None = None,
    memory0: Any = None,
    segments: Any = None,
    *,
    params: Any = None,
    framework: str = "torch",
    truncate_every: int | None = None,
    horizon: int | None = None,
    rtol: float = 1e-10,
    atol: float | None = None,
    torch: Any = None,
    jax: Any = None,
    param_map: Mapping[str, Any] | None = None,
) -> MRBPReport:
    """Compare MRBP's gradients with BPTT's on your own step, in float64, per parameter.

    One framework: ``check_mrbp(step, memory0, segments)`` (torch), or
    ``check_mrbp(step, memory0, segments, params=params, framework="jax")``. Both, plus
    torch against JAX: ``check_mrbp(torch=(step, memory0, segments), jax=(step, params,
    memory0, segments), param_map={...})``.

    Your model is never changed: a torch ``nn.Module`` step is deep-copied and the copy cast
    to float64; JAX params are cast as new arrays. Integer inputs (token ids) stay integer.
    A step that draws random numbers (dropout) must draw the same ones when MRBP replays
    a segment; check it in eval mode otherwise.

    Args:
        step: torch ``step(memory, segment) -> (loss_t, next_memory)`` (an ``nn.Module`` or
            a function of float64 ``params``); JAX ``step(params, memory, segment)``.
        memory0: the initial memory, a tensor/array or pytree (e.g. one (B, K, D) memory
            per layer), or a callable building it from the parameters so that dL/dM_0
            reaches them: torch ``memory0(model)`` gets the float64 copy (or ``params``),
            JAX ``memory0(params)`` gets the float64 params.
        segments: torch: a list of per-segment pytrees or a pytree with a leading T axis;
            JAX: a pytree with a leading T axis.
        params: JAX: the parameter pytree. Torch: None for an ``nn.Module`` step; the
            (float64) parameters a function step uses, as a module, dict or list.
        framework: "torch" or "jax".
        truncate_every: k: stop-gradient on the memory entering segment t when
            t % k == 0, t > 0, in both MRBP and BPTT.
        horizon: h: loss t back-propagates through segments w_t..t only, w_t =
            max(t - h + 1, the last cut <= t) (docs/semantics.md R.4b); BPTT then runs
            each loss's window from its cut memory (T * h steps).
        rtol, atol: an element passes when |mrbp - bptt| <= atol + rtol |bptt|
            (default atol = rtol / 100).
        torch: (step, memory0, segments[, params]) for the torch-vs-JAX form.
        jax: (step, params, memory0, segments) for the torch-vs-JAX form.
        param_map: torch parameter name -> JAX name ("reader.wq"), or (name, fn) where fn
            maps the torch array to the JAX layout (e.g. ``np.transpose`` for nn.Linear
            weights). Names it leaves out map to the same name. JAX names join pytree
            keys with dots ({"read1": {"wq": w}} -> "read1.wq").

    Returns:
        MRBPReport: ``passed``, per-row ``errors()`` (max abs, max rel), ``text`` (print it).

    Raises:
        MemcoreError: bad arguments, a model that cannot run in float64, or JAX without x64.
    """
    tol = _tol(rtol, atol)
    for name, value in (("truncate_every", truncate_every), ("horizon", horizon)):
        count = isinstance(value, int) and not isinstance(value, bool)
        if value is not None and not (count and value >= 1):
            raise MemcoreError(
                f"`{name}` must be None or an integer >= 1. Received: {name}={value!r}"
            )
    cuts = {"truncate_every": truncate_every, "horizon": horizon}
    given: dict[str, dict[str, Any]] = {}
    if torch is not None or jax is not None:
        if step is not None or memory0 is not None or segments is not None or params is not None:
            raise MemcoreError(
                "`step`, `memory0`, `segments` and `params` must be None when `torch=` or `jax=` "
                "is given (each framework's arguments go in its tuple). Received: both forms"
            )
        if torch is not None:
            given["torch"] = _unpack(torch, ("step", "memory0", "segments", "params"), 3, "torch")
        if jax is not None:
            given["jax"] = _unpack(jax, ("step", "params", "memory0", "segments"), 4, "jax")
    else:
        if framework not in FRAMEWORKS:
            raise MemcoreError(
                f"`framework` must be one of {', '.join(FRAMEWORKS)}. Received: {framework!r}"
            )
        if step is None or memory0 is None or segments is None:
            raise MemcoreError(
                "`step`, `memory0` and `segments` must be given. Received: "
                f"step={type(step).__name__}, memory0={type(memory0).__name__}, "
                f"segments={type(segments).__name__}"
            )
        given[framework] = dict(step=step, memory0=memory0, segments=segments, params=params)
    results, runs, where = [], {}, []
    for fw, args in given.items():
        bptt, mrbp, device = _run(fw, args, cuts)
        runs[fw] = mrbp
        results += _rows(fw, device, f"{fw}:mrbp-vs-bptt", _mrbp_vs_bptt(bptt, mrbp, tol))
        where.append(f"{fw} {_version(fw)} on {device}")
    if len(runs) == 2:
        comps = _torch_vs_jax(runs["torch"], runs["jax"], param_map, tol)
        results += _rows("torch-vs-jax", "cpu", "torch-vs-jax:mrbp", comps)
    header = (
        f"check_mrbp: MRBP vs BPTT in float64 | {'; '.join(where)} | "
        f"truncate_every={truncate_every} | horizon={horizon}\n"
        f"figures: abs = max |mrbp - bptt| (or |jax - torch|), rel = max relative error; "
        f"pass when |err| <= {tol.atol:g} + {tol.rtol:g} |value|"
    )
    return _report(results, header)
