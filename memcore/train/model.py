"""The trained models on any backend: initial parameters, one routed gradient, a forward.

Parameters are initialized in NumPy (float64, from the run seed) and moved to the backend.
Gradients come from the backend's routing driver chosen by ``[routing] method``; the
forward used for accuracy and evaluation composes the backend's own ops
(``lstm_cell``, ``sparse_retrieve``, ``memory_read``, ``memory_write``, ``memory_init``)
with array operators, so it runs where the backend runs (CPU or GPU).

A plain LSTM (``[model] memory = false``, routing ``tbptt``) is the SAB step with
``k_att`` larger than any sequence: no step t satisfies t % k_att == 0, nothing is ever
written, every read sees an empty memory and retrieves s = 0, so h = h_hat.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from memcore.config import MemoryConfig, SABConfig
from memcore.routing_types import HEAD_PARAM, MEMFORMER_PARAMS, SAB_PARAMS, Loss, RoutingResult
from memcore.train.config import MemformerModel, SabModel, TrainConfig
from memcore.train.tasks import input_size, num_classes

__all__ = [
    "NEVER",
    "core_config",
    "forward_outputs",
    "init_params",
    "loss_kind",
    "release_points",
    "routed_gradient",
    "sab_state0",
]

# A k_att / k_trunc no sequence reaches: "never write" / "never cut".
NEVER = 2**31 - 1


def loss_kind(config: TrainConfig) -> str:
    """ "xent" for the classification tasks (copy, recall), "mse" for adding."""
    return "mse" if config.task.name == "adding" else "xent"


def _out_dim(config: TrainConfig) -> int:
    model = config.model
    assert isinstance(model, SabModel)
    if model.out_dim:
        return model.out_dim
    return num_classes(config.task) or 1


def release_points(config: TrainConfig) -> list[str]:
    """The SAB model's settings that only the compiled paths (memcore.train.fast_torch,
    fast_jax) train: release scorer, sparsifier or truncation, two biases, no head."""
    model = config.model
    if not isinstance(model, SabModel):
        return []
    points = [f"{k}={getattr(model, k)!r}" for k in ("score_rule", "sparsify")
              if getattr(model, k) != "memcore"]  # fmt: skip
    if config.routing.truncation != "memcore":
        points.append(f"truncation={config.routing.truncation!r}")
    if model.two_biases:
        points.append("two_biases=true")
    if not model.head:
        points.append("head=false")
    return points


def core_config(config: TrainConfig) -> SABConfig | MemoryConfig:
    """The memcore config the routing drivers get (memory off: k_att = NEVER)."""
    model = config.model
    if isinstance(model, MemformerModel):
        return MemoryConfig(slots=model.slots, dim=model.dim, heads=model.heads, tau=model.tau)
    return SABConfig(
        k_top=model.k_top,
        k_att=model.k_att if model.memory else NEVER,
        k_trunc=config.routing.k_trunc or NEVER,
        eps=model.eps,
        threshold_grad=model.threshold_grad,
        block_score_grad=model.block_score_grad,
        include_h0_memory=model.include_h0_memory and model.memory,
        scorer=model.score_rule,
        sparsify=model.sparsify,
        truncation=config.routing.truncation,
    )


def init_params(config: TrainConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """float64 initial parameters.

    SAB: every matrix U(+-1/sqrt(fan_in)) (torch's LSTMCell/Linear rule), LSTM bias
    U(+-1/sqrt(Hd)) with +1 on the forget gate (gate order i, f, g, o), b_y = 0.
    Memformer: projections U(+-1/sqrt(D)), v_bias N(0, 1), head U(+-1/sqrt(D)).
    """
    model = config.model
    if model.kind == "memformer_lm":  # the library's Memformer LM: memcore/train/lm_task.py
        from memcore.train.lm_task import init_lm_params

        return init_lm_params(config, rng)

    def u(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return rng.uniform(-1.0, 1.0, shape) / np.sqrt(fan_in)

    if isinstance(model, MemformerModel):
        D = model.dim
        params = {name: u((D, D), D) for name in MEMFORMER_PARAMS[:-1]}
        params["v_bias"] = rng.normal(0.0, 1.0, (model.slots, D))
        params[HEAD_PARAM] = u((D, num_classes(config.task)), D)
        return params
    I, Hd = input_size(config.task), model.hidden
    A, O = model.scorer or Hd, _out_dim(config)
    if model.init == "release" or model.score_rule == "release" or model.two_biases:
        from memcore.train.release import release_params

        return release_params(config, rng, I, Hd, A, O)
    bias = u((4 * Hd,), Hd)
    bias[Hd : 2 * Hd] += 1.0  # forget gate: remember by default
    params = {
        "lstm_w": u((I + Hd, 4 * Hd), I + Hd),
        "lstm_b": bias,
        "w1": u((Hd, A), Hd),
        "w2": u((Hd, A), Hd),
        "w3": u((A,), A),
        "v1": u((Hd, O), Hd),
        "v2": u((Hd, O), Hd),
        "b_y": np.zeros(O),
    }
    assert tuple(params) == SAB_PARAMS
    if loss_kind(config) == "xent" and model.head:
        params[HEAD_PARAM] = u((O, num_classes(config.task)), O)
    return params


def sab_state0(
    backend: Any, batch: int, hidden: int, dtype: str, device: str | None
) -> tuple[Any, Any]:
    """(h0, c0) = 0, each (B, Hd), on the backend (SAB starts every sequence from zeros)."""
    zeros = np.zeros((batch, hidden))
    return (
        backend.from_numpy(zeros, dtype=dtype, device=device),
        backend.from_numpy(zeros, dtype=dtype, device=device),
    )


def _concat(arrays: list[Any], axis: int) -> Any:
    """Concatenate backend arrays (torch spells it cat/dim; NumPy, JAX, CuPy concatenate/axis)."""
    top = type(arrays[0]).__module__.split(".")[0]
    if top == "torch":
        return sys.modules["torch"].cat(arrays, dim=axis)
    if hasattr(arrays[0], "__array_namespace__"):
        return arrays[0].__array_namespace__().concat(arrays, axis=axis)
    if top == "cupy":
        return sys.modules["cupy"].concatenate(arrays, axis=axis)
    return np.concatenate(arrays, axis=axis)


def routed_gradient(
    backend: Any,
    config: TrainConfig,
    params: Mapping[str, Any],
    xs: Any,
    targets: Any,
    weights: tuple[float, ...],
    state0: tuple[Any, Any] | None = None,
) -> RoutingResult:
    """Loss and gradients of one batch from the routing driver ``[routing] method`` names.

    SAB starts from ``state0`` = (h0, c0) (see :func:`sab_state0`). For Memformer,
    M_0 = memory_init(v_bias); the driver's dM_0 is pulled back through
    memory_init (the backend's VJP) and added to dv_bias, so v_bias gets its whole gradient.
    """
    if config.model.kind == "memformer_lm":
        from memcore.train.lm_task import routed_gradient_lm

        return routed_gradient_lm(backend, config, params, xs, targets, weights)
    if release_points(config):
        from memcore.errors import MemcoreError

        raise MemcoreError(
            "Release-compatible SAB settings train on the compiled path only "
            "(memcore train --backend torch or jax). Received: "
            + ", ".join(release_points(config))
        )
    loss = Loss(loss_kind(config), weights)
    method, core = config.routing.method, core_config(config)
    if isinstance(config.model, MemformerModel):
        batch = int(xs.shape[1])
        m0 = backend.forward("memory_init", params["v_bias"], batch_size=batch)
        kw = {"config": core, "loss": loss, "truncate_every": config.routing.truncate_every or None}
        if method == "mrbp":
            res = backend.mrbp(params, xs, m0, targets, **kw)
        else:
            res = backend.bptt("memformer", params, xs, m0, targets, **kw)
        _, (dv,) = backend.vjp(
            "memory_init", (params["v_bias"],), {"batch_size": batch}, res.d_state0
        )
        grads = dict(res.grads)
        grads["v_bias"] = grads["v_bias"] + dv
        return RoutingResult(res.loss, grads, res.d_state0, res.final_state, res.peak_cache_bytes)
    if method == "bptt":
        return backend.bptt("sab", params, xs, state0, targets, config=core, loss=loss)
    if method == "sparse_replay":
        return backend.sab_sparse_replay(params, xs, state0, targets, config=core, loss=loss)
    return backend.sab_bptt(params, xs, state0, targets, config=core, loss=loss)  # sab_bptt, tbptt


def forward_outputs(
    backend: Any,
    config: TrainConfig,
    params: Mapping[str, Any],
    xs: Any,
    scored: slice,
    state0: tuple[Any, Any] | None = None,
) -> np.ndarray:
    """The model's outputs on the scored steps, as NumPy: logits (n, B, C) / (n, B, L, C)
    for the classification tasks, y (n, B, O) for adding (n = steps in ``scored``)."""
    if config.model.kind == "memformer_lm":
        from memcore.train.lm_task import forward_outputs_lm

        return forward_outputs_lm(backend, config, params, xs, scored)
    steps = int(xs.shape[0])
    wanted = range(steps)[scored]
    outs = []
    if isinstance(config.model, MemformerModel):
        cfg = config.model
        memory = backend.forward("memory_init", params["v_bias"], batch_size=int(xs.shape[1]))
        for t in range(steps):
            x = xs[t]
            r = backend.forward(
                "memory_read",
                x,
                memory,
                params["read_wq"],
                params["read_wk"],
                params["read_wv"],
                params["read_wo"],
                num_heads=cfg.heads,
            )
            h = x + r
            if t in wanted:
                outs.append(backend.to_numpy(h @ params[HEAD_PARAM]))
            if t + 1 < steps:
                memory = backend.forward(
                    "memory_write",
                    memory,
                    h,
                    params["write_wq"],
                    params["write_wk"],
                    params["write_wv"],
                    params["v_bias"],
                    num_heads=cfg.heads,
                    tau=cfg.tau,
                )
        return np.stack(outs)
    core = core_config(config)
    h, c = state0
    memories = h[:, None, :] if core.include_h0_memory else h[:, None, :][:, :0]
    for t in range(1, steps + 1):
        h_hat, c = backend.forward("lstm_cell", xs[t - 1], h, c, params["lstm_w"], params["lstm_b"])
        s, _ = backend.forward(
            "sparse_retrieve",
            h_hat,
            memories,
            params["w1"],
            params["w2"],
            params["w3"],
            k_top=core.k_top,
            eps=core.eps,
        )
        h = h_hat + s
        if t - 1 in wanted:
            y = h @ params["v1"] + s @ params["v2"] + params["b_y"]
            outs.append(backend.to_numpy(y @ params[HEAD_PARAM] if HEAD_PARAM in params else y))
        if t % core.k_att == 0:
            memories = _concat([memories, h[:, None, :]], axis=1)
    return np.stack(outs)
