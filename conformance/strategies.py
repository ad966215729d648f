"""Hypothesis strategies: small shared sizes, then bounded values drawn in float64.

Values come from each op's declared sampler (``OpSpec.sample``) seeded by hypothesis, so
every backend and dtype sees the same float64 draws, cast down after drawing. Routing
rollouts (:func:`memformer_cases`, :func:`sab_cases`) follow the same rule: small drawn
sizes and flags, then bounded float64 values from a drawn seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np
from hypothesis import strategies as st

from memcore.config import MemoryConfig, SABConfig
from memcore.ops import get_op
from memcore.opspec import Sample, Sizes
from memcore.routing_types import HEAD_PARAM, MEMFORMER_PARAMS, Loss

__all__ = ["RoutingCase", "memformer_cases", "sab_cases", "sizes", "samples", "seeds"]

seeds = st.integers(min_value=0, max_value=2**32 - 1)


@st.composite
def sizes(draw: st.DrawFn, *, allow_empty: bool = True) -> Sizes:
    """Small dims (glossary names). ``allow_empty`` lets L and N be 0."""
    low = 0 if allow_empty else 1
    return Sizes(
        B=draw(st.integers(1, 3), label="B"),
        L=draw(st.integers(low, 4), label="L"),
        K=draw(st.integers(1, 4), label="K"),
        H=draw(st.integers(1, 3), label="H"),
        dh=draw(st.integers(1, 3), label="dh"),
        I=draw(st.integers(1, 3), label="I"),
        Hd=draw(st.integers(1, 4), label="Hd"),
        N=draw(st.integers(low, 7), label="N"),
        A=draw(st.integers(1, 4), label="A"),
    )


@st.composite
def samples(draw: st.DrawFn, op: str, dtype: str = "float64", *, allow_empty: bool = True) -> Sample:
    """A valid call of ``op``: sizes, then values from the op's sampler with a drawn seed."""
    z = draw(sizes(allow_empty=allow_empty))
    seed = draw(seeds, label="seed")
    return get_op(op).sample(np.random.default_rng(seed), z, dtype)


# ------------------------------------------------------------------ routing rollouts
@attrs.frozen
class RoutingCase:
    """One rollout for the routing drivers, every array float64 NumPy (cast down per backend).

    Attributes:
        step: "memformer" or "sab".
        params: name -> array (MEMFORMER_PARAMS or SAB_PARAMS, plus HEAD_PARAM for xent).
        xs: (T, B, L, D) for memformer; (T, B, I) for sab.
        state0: M_0 (B, K, D), or (h0, c0) each (B, Hd).
        targets: (T, B, L, D) / (T, B, O) float for mse; (T, B, L) / (T, B) int64 for xent.
        config: MemoryConfig or SABConfig.
        loss: the Loss.
        resets: (T, B) bool or None (memformer only).
        token_mask: (T, B, L) bool or None (memformer only).
        truncate_every: int or None (memformer only).
        label: the drawn sizes and seed, for reports.
    """

    step: str
    params: Mapping[str, np.ndarray]
    xs: np.ndarray
    state0: Any
    targets: np.ndarray
    config: Any
    loss: Loss
    resets: np.ndarray | None = None
    token_mask: np.ndarray | None = None
    truncate_every: int | None = None
    label: str = ""


def _weights(draw: st.DrawFn, steps: int) -> tuple[float, ...] | None:
    if not draw(st.booleans(), label="weighted"):
        return None
    return tuple(draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=steps, max_size=steps), label="weights"))


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return rng.uniform(-scale, scale, size=shape)


@st.composite
def memformer_cases(draw: st.DrawFn, *, max_steps: int = 4) -> RoutingCase:
    """A small Memformer rollout with drawn resets, token masks, loss and truncation."""
    T = draw(st.integers(1, max_steps), label="T")
    B, L, K = draw(st.integers(1, 2), label="B"), draw(st.integers(1, 3), label="L"), draw(st.integers(1, 3), label="K")
    H, dh = draw(st.integers(1, 2), label="H"), draw(st.integers(1, 2), label="dh")
    tau = draw(st.sampled_from([0.25, 0.5, 1.0]), label="tau")
    kind = draw(st.sampled_from(["mse", "xent"]), label="loss")
    weights = _weights(draw, T)
    use_resets, use_mask = draw(st.booleans(), label="resets"), draw(st.booleans(), label="token_mask")
    truncate_every = draw(st.sampled_from([None, None, 1, 2, 3]), label="truncate_every")
    seed = draw(seeds, label="seed")
    rng = np.random.default_rng(seed)
    D = H * dh
    s = np.sqrt(3.0 / D)
    params = {n: _uniform(rng, (D, D), s) for n in MEMFORMER_PARAMS if n != "v_bias"}
    params["v_bias"] = _uniform(rng, (K, D))
    m0 = rng.standard_normal((B, K, D))
    m0 /= np.linalg.norm(m0, axis=-1, keepdims=True)
    xs = _uniform(rng, (T, B, L, D))
    if kind == "mse":
        targets = _uniform(rng, (T, B, L, D))
    else:
        classes = int(rng.integers(2, 4))
        params[HEAD_PARAM] = _uniform(rng, (D, classes), s)
        targets = rng.integers(0, classes, size=(T, B, L))
    resets = (rng.random((T, B)) < 0.3) if use_resets else None
    mask = (rng.random((T, B, L)) < 0.7) if use_mask else None
    label = f"memformer T={T} B={B} L={L} K={K} H={H} dh={dh} tau={tau} loss={kind} truncate_every={truncate_every} seed={seed}"
    return RoutingCase(
        "memformer", params, xs, m0, targets, MemoryConfig(slots=K, dim=D, heads=H, tau=tau),
        Loss(kind, weights), resets, mask, truncate_every, label,
    )


@st.composite
def sab_cases(draw: st.DrawFn, *, max_steps: int = 6) -> RoutingCase:
    """A small SAB rollout with drawn k_top, k_att, k_trunc, stop-gradient flags and loss."""
    T = draw(st.integers(1, max_steps), label="T")
    B, I = draw(st.integers(1, 2), label="B"), draw(st.integers(1, 2), label="I")  # noqa: E741
    Hd, A, O = draw(st.integers(1, 3), label="Hd"), draw(st.integers(1, 2), label="A"), draw(st.integers(1, 2), label="O")  # noqa: E741
    config = SABConfig(
        k_top=draw(st.integers(1, 3), label="k_top"),
        k_att=draw(st.integers(1, 3), label="k_att"),
        k_trunc=draw(st.integers(1, 3), label="k_trunc"),
        threshold_grad=draw(st.booleans(), label="threshold_grad"),
        block_score_grad=draw(st.booleans(), label="block_score_grad"),
        include_h0_memory=draw(st.booleans(), label="include_h0_memory"),
    )
    kind = draw(st.sampled_from(["mse", "xent"]), label="loss")
    weights = _weights(draw, T)
    seed = draw(seeds, label="seed")
    rng = np.random.default_rng(seed)
    params = {
        "lstm_w": _uniform(rng, (I + Hd, 4 * Hd), np.sqrt(3.0 / (I + Hd))),
        "lstm_b": _uniform(rng, (4 * Hd,), 0.5),
        "w1": _uniform(rng, (Hd, A), np.sqrt(3.0 / Hd)),
        "w2": _uniform(rng, (Hd, A), np.sqrt(3.0 / Hd)),
        "w3": _uniform(rng, (A,), 1.5),
        "v1": _uniform(rng, (Hd, O), np.sqrt(3.0 / Hd)),
        "v2": _uniform(rng, (Hd, O), np.sqrt(3.0 / Hd)),
        "b_y": _uniform(rng, (O,), 0.5),
    }
    xs = _uniform(rng, (T, B, I))
    state0 = (_uniform(rng, (B, Hd), 0.5), _uniform(rng, (B, Hd), 0.5))
    if kind == "mse":
        targets = _uniform(rng, (T, B, O))
    else:
        classes = int(rng.integers(2, 4))
        params[HEAD_PARAM] = _uniform(rng, (O, classes), np.sqrt(3.0 / O))
        targets = rng.integers(0, classes, size=(T, B))
    label = (
        f"sab T={T} B={B} I={I} Hd={Hd} A={A} O={O} k_top={config.k_top} k_att={config.k_att} "
        f"k_trunc={config.k_trunc} threshold_grad={config.threshold_grad} "
        f"block_score_grad={config.block_score_grad} include_h0_memory={config.include_h0_memory} "
        f"loss={kind} seed={seed}"
    )
    return RoutingCase("sab", params, xs, state0, targets, config, Loss(kind, weights), label=label)
