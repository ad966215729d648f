"""Entry checks of the torch routing drivers: shapes, dtypes and lengths per the contract.

Every failure is a ``MemcoreError`` naming the argument, the expected and the received value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from memcore.config import MemoryConfig, SABConfig
from memcore.errors import MemcoreError, expect
from memcore.options import get_options
from memcore.routing_types import HEAD_PARAM, MEMFORMER_PARAMS, SAB_PARAMS, Loss

__all__ = ["check_memformer", "check_sab"]


def _tensor(name: str, x: Any, sym: str, rank: int) -> torch.Tensor:
    expect(isinstance(x, torch.Tensor), name, f"be a torch.Tensor of shape {sym}", type(x).__name__)
    expect(x.ndim == rank, name, f"have rank {rank}, shape {sym}", f"{name}.shape={tuple(x.shape)}")
    return x


def _shape(name: str, x: Any, sym: str, shape: tuple[int, ...]) -> None:
    _tensor(name, x, sym, len(shape))
    expect(
        tuple(x.shape) == shape,
        name,
        f"have shape {sym} = {shape}",
        f"{name}.shape={tuple(x.shape)}",
    )


def _float(name: str, x: torch.Tensor, dtype: torch.dtype) -> None:
    expect(
        x.dtype == dtype,
        name,
        f"have the dtype of `xs` ({str(dtype).removeprefix('torch.')})",
        f"{name}.dtype={str(x.dtype).removeprefix('torch.')}",
    )
    if get_options().check_finite:
        expect(
            bool(torch.isfinite(x).all()),
            name,
            "be finite (no NaN or Inf)",
            f"{name} with non-finite entries",
        )


def _bool(name: str, x: Any, sym: str, shape: tuple[int, ...]) -> None:
    _shape(name, x, sym, shape)
    expect(
        x.dtype == torch.bool,
        name,
        "have dtype bool",
        f"{name}.dtype={str(x.dtype).removeprefix('torch.')}",
    )


def _common(loss: Any, config: Any, config_type: type, T: int) -> None:
    expect(
        isinstance(config, config_type),
        "config",
        f"be a memcore.{config_type.__name__}",
        type(config).__name__,
    )
    expect(isinstance(loss, Loss), "loss", "be a memcore.routing_types.Loss", type(loss).__name__)
    expect(T >= 1, "xs", "have T >= 1 time steps", f"T={T}")
    if loss.weights is not None:
        expect(
            len(loss.weights) == T,
            "loss.weights",
            f"have length T = {T}",
            f"len(loss.weights)={len(loss.weights)}",
        )


def _keys(params: Any, names: tuple[str, ...], loss: Loss) -> None:
    expect(
        isinstance(params, Mapping), "params", "be a mapping name -> tensor", type(params).__name__
    )
    want = set(names) | ({HEAD_PARAM} if loss.kind == "xent" else set())
    got = set(params)
    if got != want:
        raise MemcoreError(
            f"`params` must have exactly the keys {sorted(want)}. "
            f"Received: missing {sorted(want - got)}, "
            f"unexpected {sorted(got - want)}"
        )


def _params(
    params: Any,
    names: tuple[str, ...],
    loss: Loss,
    shapes: dict[str, tuple[str, tuple[int, ...]]],
    dtype: torch.dtype,
    out_width: int,
) -> int:
    """Check the parameter dict; return the class count C for xent (0 for mse)."""
    _keys(params, names, loss)
    classes = 0
    if loss.kind == "xent":
        head = _tensor(f"params['{HEAD_PARAM}']", params[HEAD_PARAM], "(Dy, C)", 2)
        classes = int(head.shape[1])
        shapes = {**shapes, HEAD_PARAM: ("(Dy, C)", (out_width, max(classes, 1)))}
    for key, (sym, shape) in shapes.items():
        name = f"params['{key}']"
        _shape(name, params[key], sym, shape)
        _float(name, params[key], dtype)
    return classes


def _targets(
    targets: Any,
    loss: Loss,
    float_shape: tuple[int, ...],
    sym: str,
    dtype: torch.dtype,
    classes: int,
) -> None:
    if loss.kind == "mse":
        _shape("targets", targets, sym, float_shape)
        _float("targets", targets, dtype)
        return
    shape = float_shape[:-1]
    _shape("targets", targets, sym.rsplit(",", 1)[0] + ")", shape)
    expect(
        not targets.is_floating_point() and targets.dtype != torch.bool,
        "targets",
        "have an integer dtype (class ids) for xent",
        f"targets.dtype={str(targets.dtype).removeprefix('torch.')}",
    )
    if targets.numel():
        lo, hi = int(targets.min()), int(targets.max())
        expect(
            lo >= 0 and hi < classes,
            "targets",
            f"hold class ids in [0, {classes})",
            f"min={lo}, max={hi}",
        )


def check_memformer(
    params, xs, M0, targets, *, config, loss, resets, token_mask, truncate_every
) -> None:
    """Validate a Memformer routing call (bptt "memformer" and mrbp)."""
    _tensor("xs", xs, "(T, B, L, D)", 4)
    T, B, L, D = (int(s) for s in xs.shape)
    _common(loss, config, MemoryConfig, T)
    expect(xs.is_floating_point(), "xs", "have a floating dtype", f"xs.dtype={xs.dtype}")
    expect(
        D == config.dim,
        "xs",
        f"have width D = config.dim = {config.dim}",
        f"xs.shape={tuple(xs.shape)}",
    )
    _float("xs", xs, xs.dtype)
    K = config.slots
    _shape("M0", M0, "(B, K, D)", (B, K, D))
    _float("M0", M0, xs.dtype)
    shapes = {n: ("(D, D)", (D, D)) for n in MEMFORMER_PARAMS if n != "v_bias"}
    shapes["v_bias"] = ("(K, D)", (K, D))
    classes = _params(params, MEMFORMER_PARAMS, loss, shapes, xs.dtype, D)
    _targets(targets, loss, (T, B, L, D), "(T, B, L, D)", xs.dtype, classes)
    if resets is not None:
        _bool("resets", resets, "(T, B)", (T, B))
    if token_mask is not None:
        _bool("token_mask", token_mask, "(T, B, L)", (T, B, L))
    if truncate_every is not None:
        ok = (
            isinstance(truncate_every, int)
            and not isinstance(truncate_every, bool)
            and truncate_every >= 1
        )
        expect(
            ok, "truncate_every", "be None or an integer >= 1", f"truncate_every={truncate_every!r}"
        )


def check_sab(params, xs, state0, targets, *, config, loss) -> None:
    """Validate a SAB routing call (bptt "sab", sab_bptt, sab_sparse_replay)."""
    _tensor("xs", xs, "(T, B, I)", 3)
    T, B, I = (int(s) for s in xs.shape)  # noqa: E741 - glossary names
    _common(loss, config, SABConfig, T)
    expect(xs.is_floating_point(), "xs", "have a floating dtype", f"xs.dtype={xs.dtype}")
    _float("xs", xs, xs.dtype)
    expect(
        isinstance(state0, (tuple, list)) and len(state0) == 2,
        "state0",
        "be a pair (h0, c0)",
        f"{type(state0).__name__} of length "
        f"{len(state0) if isinstance(state0, (tuple, list)) else '-'}",
    )
    h0 = _tensor("state0[0]", state0[0], "(B, Hd)", 2)
    Hd = int(h0.shape[1])
    expect(
        Hd >= 1, "state0[0]", "have a hidden width Hd >= 1", f"state0[0].shape={tuple(h0.shape)}"
    )
    for i, name in enumerate(("state0[0]", "state0[1]")):
        _shape(name, state0[i], "(B, Hd)", (B, Hd))
        _float(name, state0[i], xs.dtype)
    _keys(params, SAB_PARAMS, loss)
    w1 = _tensor("params['w1']", params["w1"], "(Hd, A)", 2)
    v1 = _tensor("params['v1']", params["v1"], "(Hd, O)", 2)
    A, O = int(w1.shape[1]), int(v1.shape[1])  # noqa: E741 - glossary names
    shapes = {
        "lstm_w": ("(I+Hd, 4*Hd)", (I + Hd, 4 * Hd)),
        "lstm_b": ("(4*Hd,)", (4 * Hd,)),
        "w1": ("(Hd, A)", (Hd, A)),
        "w2": ("(Hd, A)", (Hd, A)),
        "w3": ("(A,)", (A,)),
        "v1": ("(Hd, O)", (Hd, O)),
        "v2": ("(Hd, O)", (Hd, O)),
        "b_y": ("(O,)", (O,)),
    }
    classes = _params(params, SAB_PARAMS, loss, shapes, xs.dtype, O)
    _targets(targets, loss, (T, B, O), "(T, B, O)", xs.dtype, classes)
