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

__all__ = [
    "RoutingCase",
    "RoutingLayout",
    "build_case",
    "memformer_cases",
    "memformer_layouts",
    "sab_cases",
    "sab_layouts",
    "samples",
    "scaled",
    "scales",
    "seeds",
    "sizes",
]

seeds = st.integers(min_value=0, max_value=2**32 - 1)

# The magnitude of an op example's activations (its first float input: x, memory, m,
# h_hat, scores, ...): unit scale in most examples, up to 1e4 in the rest, where float32
# loses digits and a backend's numerics (max subtraction, accumulation order) show.
scales = st.sampled_from([1.0, 1.0, 1.0, 1e2, 1e3, 1e4])


def scaled(sample: Sample, scale: float) -> Sample:
    """``sample`` with its first float input multiplied by ``scale`` (a new Sample)."""
    if scale == 1.0:
        return sample
    inputs = list(sample.inputs)
    for i, x in enumerate(inputs):
        if isinstance(x, np.ndarray) and x.dtype.kind == "f":
            inputs[i] = x * scale
            break
    return Sample(tuple(inputs), dict(sample.attrs))


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
def samples(
    draw: st.DrawFn, op: str, dtype: str = "float64", *, allow_empty: bool = True
) -> Sample:
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
    return tuple(
        draw(
            st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=steps, max_size=steps),
            label="weights",
        )
    )


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return rng.uniform(-scale, scale, size=shape)


@attrs.frozen
class RoutingLayout:
    """Everything about a rollout except its values: sizes, config, loss, which options are on.

    Rollouts of one layout share every shape and static setting, so a jitting backend
    compiles once per layout; :func:`build_case` fills in the values from a seed.
    """

    step: str
    dims: Mapping[str, int]
    config: Any
    loss: Loss
    resets: bool = False
    token_mask: bool = False
    truncate_every: int | None = None

    @property
    def label(self) -> str:
        dims = " ".join(f"{k}={v}" for k, v in self.dims.items())
        extra = ""
        if self.step == "memformer":
            extra = (
                f" tau={self.config.tau} resets={self.resets} token_mask={self.token_mask}"
                f" truncate_every={self.truncate_every}"
            )
        else:
            c = self.config
            extra = (
                f" k_top={c.k_top} k_att={c.k_att} k_trunc={c.k_trunc} threshold_grad={c.threshold_grad} "
                f"block_score_grad={c.block_score_grad} include_h0_memory={c.include_h0_memory}"
            )
        return f"{self.step} {dims}{extra} loss={self.loss.kind} weights={self.loss.weights}"


@st.composite
def memformer_layouts(draw: st.DrawFn, *, max_steps: int = 4) -> RoutingLayout:
    """Sizes, config, loss, resets / token-mask switches and truncation of a Memformer rollout."""
    T = draw(st.integers(1, max_steps), label="T")
    dims = {
        "T": T,
        "B": draw(st.integers(1, 2), label="B"),
        "L": draw(st.integers(1, 3), label="L"),
        "K": draw(st.integers(1, 3), label="K"),
        "H": draw(st.integers(1, 2), label="H"),
        "dh": draw(st.integers(1, 2), label="dh"),
    }
    tau = draw(st.sampled_from([0.25, 0.5, 1.0]), label="tau")
    kind = draw(st.sampled_from(["mse", "xent"]), label="loss")
    dims["C"] = draw(st.integers(2, 3), label="C") if kind == "xent" else 0
    config = MemoryConfig(slots=dims["K"], dim=dims["H"] * dims["dh"], heads=dims["H"], tau=tau)
    return RoutingLayout(
        "memformer",
        dims,
        config,
        Loss(kind, _weights(draw, T)),
        resets=draw(st.booleans(), label="resets"),
        token_mask=draw(st.booleans(), label="token_mask"),
        truncate_every=draw(st.sampled_from([None, None, 1, 2, 3]), label="truncate_every"),
    )


@st.composite
def sab_layouts(draw: st.DrawFn, *, max_steps: int = 6) -> RoutingLayout:
    """Sizes, SABConfig (k_top, k_att, k_trunc, stop-gradient flags) and loss of a SAB rollout."""
    T = draw(st.integers(1, max_steps), label="T")
    dims = {
        "T": T,
        "B": draw(st.integers(1, 2), label="B"),
        "I": draw(st.integers(1, 2), label="I"),
        "Hd": draw(st.integers(1, 3), label="Hd"),
        "A": draw(st.integers(1, 2), label="A"),
        "O": draw(st.integers(1, 2), label="O"),
    }
    config = SABConfig(
        k_top=draw(st.integers(1, 3), label="k_top"),
        k_att=draw(st.integers(1, 3), label="k_att"),
        k_trunc=draw(st.integers(1, 3), label="k_trunc"),
        threshold_grad=draw(st.booleans(), label="threshold_grad"),
        block_score_grad=draw(st.booleans(), label="block_score_grad"),
        include_h0_memory=draw(st.booleans(), label="include_h0_memory"),
    )
    kind = draw(st.sampled_from(["mse", "xent"]), label="loss")
    dims["C"] = draw(st.integers(2, 3), label="C") if kind == "xent" else 0
    return RoutingLayout("sab", dims, config, Loss(kind, _weights(draw, T)))


def build_case(layout: RoutingLayout, seed: int) -> RoutingCase:
    """The rollout of ``layout`` with bounded float64 values drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    z = layout.dims
    T, B, C = z["T"], z["B"], z["C"]
    label = f"{layout.label} seed={seed}"
    if layout.step == "memformer":
        L, K, D = z["L"], z["K"], z["H"] * z["dh"]
        s = np.sqrt(3.0 / D)
        params = {n: _uniform(rng, (D, D), s) for n in MEMFORMER_PARAMS if n != "v_bias"}
        params["v_bias"] = _uniform(rng, (K, D))
        m0 = rng.standard_normal((B, K, D))
        m0 /= np.linalg.norm(m0, axis=-1, keepdims=True)
        xs = _uniform(rng, (T, B, L, D))
        if layout.loss.kind == "mse":
            targets = _uniform(rng, (T, B, L, D))
        else:
            params[HEAD_PARAM] = _uniform(rng, (D, C), s)
            targets = rng.integers(0, C, size=(T, B, L))
        resets = (rng.random((T, B)) < 0.3) if layout.resets else None
        mask = (rng.random((T, B, L)) < 0.7) if layout.token_mask else None
        return RoutingCase(
            "memformer",
            params,
            xs,
            m0,
            targets,
            layout.config,
            layout.loss,
            resets,
            mask,
            layout.truncate_every,
            label,
        )
    I, Hd, A, O = z["I"], z["Hd"], z["A"], z["O"]
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
    if layout.loss.kind == "mse":
        targets = _uniform(rng, (T, B, O))
    else:
        params[HEAD_PARAM] = _uniform(rng, (O, C), np.sqrt(3.0 / O))
        targets = rng.integers(0, C, size=(T, B))
    return RoutingCase("sab", params, xs, state0, targets, layout.config, layout.loss, label=label)


@st.composite
def memformer_cases(draw: st.DrawFn, *, max_steps: int = 4) -> RoutingCase:
    """A small Memformer rollout: a drawn layout filled from a drawn seed."""
    return build_case(draw(memformer_layouts(max_steps=max_steps)), draw(seeds, label="seed"))


@st.composite
def sab_cases(draw: st.DrawFn, *, max_steps: int = 6) -> RoutingCase:
    """A small SAB rollout: a drawn layout filled from a drawn seed."""
    return build_case(draw(sab_layouts(max_steps=max_steps)), draw(seeds, label="seed"))
