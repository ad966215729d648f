"""The segment-recall LM task and the Memformer LM's gradients and outputs for the trainer.

Batches are NumPy (seeded like every task, see :mod:`memcore.train.tasks`); parameters are
a flat dict under the torch model's ``state_dict`` names (float64 NumPy at init, then the
backend's arrays), which the trainer's Adam and checkpoints handle like any other model's.

* torch: the dict is copied into a cached :class:`~memcore.backends.torch.memformer.MemformerLM`
  and the model itself is the step of the model-agnostic MRBP
  (``memcore.backends.torch.mrbp_model.mrbp``) or of a plain BPTT loop; the gradients are
  read back from ``.grad``.
* jax: the dict becomes the pytree of :mod:`memcore.backends.jax.memformer`
  (``from_flat``) and ``segment_loss`` is the step; BPTT is ``jax.value_and_grad`` of the
  rollout, MRBP is ``memcore.backends.jax.mrbp_model.mrbp`` under ``jax.jit``.

Segment t's loss is ``weights[t]`` times its mean cross-entropy (the model's per-token
``weights`` = weights[t] / (B L)); recall scores only the last segment.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from memcore.errors import MemcoreError
from memcore.routing_types import RoutingResult
from memcore.train.lm_config import LMRecallTask, lm_vocab

if TYPE_CHECKING:
    from memcore.train.config import TrainConfig
    from memcore.train.tasks import Batch

__all__ = [
    "BACKENDS",
    "forward_outputs_lm",
    "init_lm_params",
    "lm_recall_batch",
    "model_config",
    "routed_gradient_lm",
]

BACKENDS = ("torch", "jax")
"""The backends that can train the Memformer LM (it is a framework model, not a memcore op)."""


def model_config(config: TrainConfig):
    """The library model's :class:`~memcore.models.MemformerConfig` for this run."""
    return config.model.model_config(lm_vocab(config.task))


# ----------------------------------------------------------------------------- task
def lm_recall_batch(task: LMRecallTask, rng: np.random.Generator, batch: int) -> Batch:
    """Token ids: value v is v; "item i has value v" is V + i V + v; "item i?" is
    V + L V + i; the blank is V + L V + L.

    Returns xs (S + 1, B, L) int64 tokens, targets (S + 1, B, L) int64 (the values at the
    last segment, 0 elsewhere) and weights (0, ..., 0, 1).
    """
    from memcore.train.tasks import Batch

    S, L, V = task.segments, task.items, task.values
    values = rng.integers(0, V, size=(batch, L))
    pos = np.arange(L)
    xs = np.empty((S + 1, batch, L), dtype=np.int64)
    xs[0] = V + pos * V + values
    for s in range(1, S):
        if task.distractors == "noise":
            xs[s] = rng.integers(0, V, size=(batch, L))
        else:
            xs[s] = V + L * V + L
    xs[S] = V + L * V + pos
    targets = np.zeros((S + 1, batch, L), dtype=np.int64)
    targets[S] = values
    return Batch(xs, targets, (0.0,) * S + (1.0,))


# ----------------------------------------------------------------------------- params
def _shapes(c) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """name -> (shape, kind, fan_in) in the torch model's parameter order."""
    D, F, C = c.dim, c.ffn_mult * c.dim, c.vocab
    out: dict[str, tuple[tuple[int, ...], str, int]] = {"emb.weight": ((C, D), "normal", 0)}
    for i in range(c.layers):
        p = f"layers.{i}"
        ln = {f"{p}.{n}.{w}": ((D,), w, 0) for n in ("ln_attn", "ln_read", "ln_ffn")
              for w in ("weight", "bias")}  # fmt: skip
        out.update({k: v for k, v in ln.items() if ".ln_attn." in k})
        out[f"{p}.qkv.weight"] = ((3 * D, D), "linear", D)
        out[f"{p}.proj.weight"] = ((D, D), "linear", D)
        out.update({k: v for k, v in ln.items() if ".ln_read." in k})
        out.update({f"{p}.reader.{n}": ((D, D), "memory", D) for n in ("wq", "wk", "wv", "wo")})
        out.update({k: v for k, v in ln.items() if ".ln_ffn." in k})
        out[f"{p}.fc1.weight"] = ((F, D), "linear", D)
        out[f"{p}.fc1.bias"] = ((F,), "linear", D)
        out[f"{p}.fc2.weight"] = ((D, F), "linear", F)
        out[f"{p}.fc2.bias"] = ((D,), "linear", F)
    out.update({f"ln_write.{w}": ((D,), w, 0) for w in ("weight", "bias")})
    out.update({f"writer.{n}": ((D, D), "memory", D) for n in ("wq", "wk", "wv")})
    out["writer.v_bias"] = ((c.slots, D), "memory", D)
    out.update({f"ln_out.{w}": ((D,), w, 0) for w in ("weight", "bias")})
    out["head.weight"] = ((C, D), "linear", D)
    return out


def init_lm_params(config: TrainConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """float64 parameters drawn as the torch model draws them: embedding N(0, 1),
    ``nn.Linear`` weights and biases U(+-1/sqrt(fan_in)), memory projections and v_bias
    U(+-sqrt(3/D)), LayerNorm 1 and 0."""
    out = {}
    for name, (shape, kind, fan_in) in _shapes(model_config(config)).items():
        if kind == "normal":
            out[name] = rng.normal(0.0, 1.0, shape)
        elif kind in ("weight", "bias"):
            out[name] = np.full(shape, 1.0 if kind == "weight" else 0.0)
        else:
            bound = np.sqrt((3.0 if kind == "memory" else 1.0) / fan_in)
            out[name] = rng.uniform(-bound, bound, shape)
    return out


def _check_backend(backend: Any) -> None:
    if backend.name not in BACKENDS:
        raise MemcoreError(
            f"`--backend` must be one of {', '.join(BACKENDS)} for model 'memformer_lm' (a "
            f"framework model, trained through the framework's autodiff). Received: "
            f"backend={backend.name!r}"
        )


# ----------------------------------------------------------------------------- torch
@functools.lru_cache(maxsize=4)
def _torch_model(c, dtype: str, device: str):
    import torch

    from memcore.backends.torch.memformer import MemformerLM

    return MemformerLM(c, dtype=getattr(torch, dtype), device=device)


def _torch_load(config: TrainConfig, params: Mapping[str, Any]):
    """The cached module holding ``params`` (copied in), gradients cleared."""
    import torch

    any_p = next(iter(params.values()))
    model = _torch_model(model_config(config), str(any_p.dtype).split(".")[-1], str(any_p.device))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    model.zero_grad(set_to_none=True)
    return model


def _torch_gradient(config: TrainConfig, params, xs, targets, weights) -> RoutingResult:
    import torch

    model = _torch_load(config, params)
    tokens, tgts = xs.round().long(), targets.long()
    T, B, L = tokens.shape
    segments = [
        {"tokens": tokens[t], "targets": tgts[t],
         "weights": torch.tensor(weights[t] / (B * L), dtype=xs.dtype, device=xs.device)}
        for t in range(T)
    ]  # fmt: skip
    m0 = model.init_memory(B)
    truncate = config.routing.truncate_every or None
    if config.routing.method == "mrbp":
        from memcore.backends.torch.mrbp_model import mrbp

        res = mrbp(model, m0, segments, truncate_every=truncate)
        loss, final = float(res.loss), res.memory
    else:
        total, m = 0.0, m0
        for t, seg in enumerate(segments):
            if truncate and t and t % truncate == 0:
                m = m.detach()
            loss_t, m = model(m, seg)
            total = total + loss_t
        total.backward()
        loss, final = float(total.detach()), m.detach()
    grads = {
        n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
        for n, p in model.named_parameters()
    }
    return RoutingResult(loss, grads, None, final, 0)


# ----------------------------------------------------------------------------- jax
@functools.lru_cache(maxsize=8)
def _jax_step(c, batch: int):
    """The step and memory0 callables, one object per (config, B): the JAX drivers key their
    compiled programs on them."""
    from memcore.backends.jax import memformer as jm

    step = functools.partial(jm.segment_loss, config=c)
    return step, functools.partial(jm.init_memory, batch=batch, config=c)


def _jax_gradient(config: TrainConfig, params, xs, targets, weights) -> RoutingResult:
    import jax.numpy as jnp

    from memcore.backends.jax import memformer as jm
    from memcore.backends.jax import mrbp_model

    c = model_config(config)
    _, B, L = xs.shape
    w = jnp.asarray(np.asarray(weights) / (B * L), dtype=xs.dtype)
    tokens = jnp.round(xs).astype(jnp.int32)
    step, memory0 = _jax_step(c, B)
    driver = getattr(mrbp_model, config.routing.method)  # mrbp or bptt
    segments = {"tokens": tokens, "targets": targets.astype(jnp.int32), "weights": w}
    loss, grads, final = driver(
        step, jm.from_flat(params, c), memory0, segments,
        truncate_every=config.routing.truncate_every or None,
    )  # fmt: skip
    return RoutingResult(float(loss), jm.to_flat(grads, c), None, final, 0)


# ----------------------------------------------------------------------------- entry points
def routed_gradient_lm(
    backend: Any,
    config: TrainConfig,
    params: Mapping[str, Any],
    xs: Any,
    targets: Any,
    weights: tuple[float, ...],
) -> RoutingResult:
    """Loss and gradients of one batch: tokens xs (T, B, L) (ids, possibly as floats),
    targets (T, B, L), per-segment loss weights (T,); ``[routing] method`` picks MRBP or
    BPTT. The initial memory M_0 = normalize(v_bias) is part of the rollout, so v_bias
    gets its whole gradient."""
    _check_backend(backend)
    if backend.name == "torch":
        return _torch_gradient(config, params, xs, targets, weights)
    return _jax_gradient(config, params, xs, targets, weights)


def forward_outputs_lm(
    backend: Any, config: TrainConfig, params: Mapping[str, Any], xs: Any, scored: slice
) -> np.ndarray:
    """Logits (n, B, L, C) of the scored segments, as NumPy (no gradient)."""
    _check_backend(backend)
    steps = int(xs.shape[0])
    wanted = range(steps)[scored]
    outs = []
    if backend.name == "torch":
        import torch

        model = _torch_load(config, params)
        tokens = xs.round().long()
        with torch.no_grad():
            m = model.init_memory(tokens.shape[1])
            for t in range(steps):
                x = model.encode(tokens[t], m)
                if t in wanted:
                    outs.append(model.logits(x).cpu().numpy())
                m = model.write(m, x)
        return np.stack(outs)
    import jax.numpy as jnp

    from memcore.backends.jax import memformer as jm

    c = model_config(config)
    tokens = jnp.round(xs).astype(jnp.int32)
    return np.asarray(_jax_outputs(c, tuple(wanted))(jm.from_flat(params, c), tokens))


@functools.lru_cache(maxsize=8)
def _jax_outputs(c, wanted: tuple[int, ...]):
    import jax
    import jax.numpy as jnp

    from memcore.backends.jax import memformer as jm

    def run(p, tokens):
        m, outs = jm.init_memory(p, tokens.shape[1], c), []
        for t in range(tokens.shape[0]):
            if t in wanted:
                outs.append(jm.logits(p, m, tokens[t], c))
            m = jm.advance(p, m, tokens[t], c)
        return jnp.stack(outs)

    return jax.jit(run)
