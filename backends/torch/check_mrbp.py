"""The torch half of :func:`memcore.check_mrbp`: one user step run by MRBP and by BPTT in float64.

The user's model is never touched: an ``nn.Module`` step is deep-copied and the copy cast
to float64; a plain-function step must already hold float64 parameters, whose ``.grad``
is saved before MRBP accumulates into it and restored afterwards. Inputs are copied to
float64 (integer tensors, e.g. token ids, are kept as they are).

BPTT is plain autograd through a Python loop over the same step (the definition MRBP
must match); MRBP is :func:`memcore.backends.torch.mrbp_model.mrbp`. Results come back
as NumPy arrays for :mod:`memcore.check_model` to compare.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from memcore.check_model import Run, window_start
from memcore.errors import MemcoreError

__all__ = ["prepare", "run_both", "split_segments"]


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy().copy()


def _to64(tree: Any) -> Any:
    """A copy of ``tree`` with every floating tensor as a detached float64 tensor."""

    def cast(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            x = x.detach()
            return x.to(torch.float64, copy=True) if x.is_floating_point() else x.clone()
        return x

    return pytree.tree_map(cast, tree)


def _named_params(params: Any) -> dict[str, torch.Tensor]:
    if isinstance(params, nn.Module):
        return {n: p for n, p in params.named_parameters() if p.requires_grad}
    if isinstance(params, Mapping):
        return dict(params)
    if isinstance(params, torch.Tensor):
        return {"0": params}
    if isinstance(params, Iterable):
        return {str(i): p for i, p in enumerate(params)}
    raise MemcoreError(
        "`params` must be an nn.Module, a dict of tensors or a sequence of tensors. "
        f"Received: {type(params).__name__}"
    )


def prepare(step: Any, params: Any) -> tuple[Callable, Any, dict[str, torch.Tensor], bool]:
    """(float64 step, what a callable memory0 receives, named float64 params, borrowed).

    ``borrowed`` is True when the params are the user's own (plain-function step): their
    ``.grad`` must then be saved and restored around MRBP.
    """
    if isinstance(step, nn.Module):
        if params is not None and params is not step:
            raise MemcoreError(
                "`params` must be None (the module's own parameters) when `step` is an nn.Module. "
                f"Received: params of type {type(params).__name__}"
            )
        try:
            model = copy.deepcopy(step).to(torch.float64)
        except (TypeError, RuntimeError) as exc:
            raise MemcoreError(
                "`step` must be copyable to float64 on its device. "
                f"Received: {type(exc).__name__}: {exc}"
            ) from None
        named = _named_params(model)
        return model, model, named, False
    if not callable(step):
        raise MemcoreError(
            "`step` must be a callable step(memory, segment) -> (loss, next_memory) "
            "or an nn.Module. "
            f"Received: {type(step).__name__}"
        )
    if params is None:
        raise MemcoreError(
            "`params` must be given when `step` is a plain function (an nn.Module, a dict "
            "of tensors or a list of tensors). Received: params=None"
        )
    named = _named_params(params)
    for name, p in named.items():
        if not isinstance(p, torch.Tensor) or p.dtype != torch.float64 or not p.is_leaf:
            got = (
                f"dtype={p.dtype}, leaf={p.is_leaf}"
                if isinstance(p, torch.Tensor)
                else type(p).__name__
            )
            raise MemcoreError(
                "`params` must be float64 leaf tensors when `step` is a plain function "
                "(memcore cannot cast a function's closure without changing your tensors; pass "
                "an nn.Module as `step` or build the parameters in float64). "
                f"Received: params[{name!r}] {got}"
            )
        if not p.requires_grad:
            raise MemcoreError(
                f"`params` must require grad. Received: params[{name!r}].requires_grad=False"
            )
    return step, params, named, True


def split_segments(segments: Any) -> list[Any]:
    """Segment t for each t, as :func:`~memcore.backends.torch.mrbp_model.mrbp` reads them."""
    from memcore.backends.torch._mrbp_tree import Segments

    seq = Segments(segments)
    return [seq[t] for t in range(len(seq))]


def _memory_leaves(m: Any) -> list[np.ndarray]:
    return [_numpy(x) for x in pytree.tree_leaves(m) if isinstance(x, torch.Tensor)]


def _memory0(memory0: Any, owner: Any) -> Any:
    built = callable(memory0) and not isinstance(memory0, torch.Tensor)
    return memory0(owner) if built else memory0


def _detach(tree: Any) -> Any:
    return pytree.tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


def _bptt(step, memory0, owner, segs, named, truncate_every, horizon) -> Run:
    m0 = _memory0(memory0, owner)
    T = len(segs)
    if horizon is None:  # one unroll, cut where truncate_every says
        m, losses = m0, []
        for t, seg in enumerate(segs):
            if truncate_every is not None and t > 0 and t % truncate_every == 0:
                m = _detach(m)
            loss_t, m = step(m, seg)
            losses.append(loss_t)
    else:  # the definition itself: loss t through its own window, from a cut memory
        with torch.no_grad():
            ms = [m0]
            for seg in segs:
                ms.append(step(ms[-1], seg)[1])
        losses = []
        for t in range(T):
            w = window_start(t, truncate_every, horizon)
            m = m0 if w == 0 else _detach(ms[w])
            for s in range(w, t + 1):
                loss_t, m = step(m, segs[s])
            losses.append(loss_t)
        m = ms[T]
    total = functools.reduce(lambda a, b: a + b, losses)
    names = list(named)
    grads = torch.autograd.grad(total, [named[n] for n in names], allow_unused=True)
    return Run(
        float(total.detach()),
        {n: _numpy(torch.zeros_like(named[n]) if g is None else g) for n, g in zip(names, grads)},
        {n: _numpy(named[n]) for n in names},
        _memory_leaves(m),
    )


def _mrbp(mrbp, step, memory0, owner, segs, named, truncate_every, horizon, borrowed) -> Run:
    saved = {n: p.grad for n, p in named.items()} if borrowed else {}
    try:
        for p in named.values():
            p.grad = None
        out = mrbp(
            step, _memory0(memory0, owner), segs, truncate_every=truncate_every, horizon=horizon
        )
        loss, memory = out[0], out[1]
        grads = {
            n: _numpy(torch.zeros_like(p) if p.grad is None else p.grad)
            for n, p in named.items()
        }
    finally:
        for n, g in saved.items():
            named[n].grad = g
    return Run(float(loss), grads, {n: _numpy(p) for n, p in named.items()}, _memory_leaves(memory))


def _default_mrbp() -> Callable:
    from memcore.backends.torch.mrbp_model import mrbp

    return mrbp


def run_both(
    step: Any,
    memory0: Any,
    segments: Any,
    *,
    params: Any = None,
    truncate_every: int | None = None,
    horizon: int | None = None,
    mrbp: Callable | None = None,
) -> tuple[Run, Run, str]:
    """(BPTT run, MRBP run, device) of ``step`` in float64; see :func:`memcore.check_mrbp`.

    Args:
        step: ``step(memory, segment) -> (loss_t, next_memory)``, a function or nn.Module.
        memory0: a tensor or pytree of tensors, or ``memory0(model) -> memory`` called on
            the float64 copy (or on ``params`` for a function step) so that dL/dM_0 reaches
            the parameters it is made from.
        segments: a list of per-segment pytrees, or a pytree with a leading T axis.
        params: None for an nn.Module step; the float64 parameters of a function step.
        truncate_every: k: stop-gradient on the memory entering segment t when t % k == 0, t > 0.
        horizon: h: loss t back-propagates through segments w_t..t only (docs/semantics.md R.4b).
        mrbp: the MRBP driver (default: the library's).
    """
    step64, owner, named, borrowed = prepare(step, params)
    m0 = memory0 if callable(memory0) and not isinstance(memory0, torch.Tensor) else _to64(memory0)
    segs = [_to64(s) for s in split_segments(segments)]
    devices = {p.device for p in named.values()}
    if not segs:
        raise MemcoreError("`segments` must hold T >= 1 segments. Received: T=0")
    bptt = _bptt(step64, m0, owner, segs, named, truncate_every, horizon)
    driver = mrbp or _default_mrbp()
    out = _mrbp(driver, step64, m0, owner, segs, named, truncate_every, horizon, borrowed)
    return bptt, out, ",".join(sorted(str(d) for d in devices)) or "cpu"
