"""The Memformer language model in JAX: pure functions of a parameter pytree.

The same model as :mod:`memcore.backends.torch.memformer` (see its docstring for the
architecture and for why the paper's decoder is left out), the same math: token embedding;
``config.layers`` pre-norm layers of causal self-attention, memory read (memcore's
``memory_read``) and FFN; the memory write (``memory_write``: slot attention + BMN) after
the last layer; a linear head and the next-token cross-entropy.

* ``init(key, config) -> params``; ``init_memory(params, batch, config)`` = normalize(v_bias).
* ``segment_loss(params, memory, segment, config) -> (loss, next_memory)``: with
  ``functools.partial(segment_loss, config=config)`` it is the ``step(params, memory,
  segment)`` of ``memcore.backends.jax.mrbp_model.mrbp``; jit-, grad- and vmap-friendly
  (the config is a frozen attrs record: hashable, a static argument).
* ``advance(params, memory, tokens, config)``: the memory path alone (no head, no loss).
* ``from_flat`` / ``to_flat``: the pytree from / to a flat dict under the torch model's
  ``state_dict`` names and layouts (torch ``nn.Linear`` weights are (out, in); here every
  dense weight is (in, out), used as ``x @ w``), so one set of parameters runs in both.

Params: ``emb`` (C, D); ``layers``: a list of {ln_attn, qkv (D, 3D), proj (D, D), ln_read,
read {wq, wk, wv, wo}, ln_ffn, fc1 {w (D, F), b (F,)}, fc2 {w (F, D), b (D,)}}; ``ln_write``;
``write`` {wq, wk, wv, v_bias (K, D)}; ``ln_out``; ``head`` (D, C). Each ``ln_*`` is
{scale (D,), bias (D,)}.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memcore.backends.jax.attention import memory_read
from memcore.backends.jax.memory import memory_init, memory_write
from memcore.errors import MemcoreError
from memcore.models import MemformerConfig

__all__ = ["advance", "from_flat", "init", "init_memory", "logits", "segment_loss", "to_flat"]

_LN_EPS = 1e-5  # torch.nn.LayerNorm's default
_HALVES = (jnp.float16, jnp.bfloat16)


def _check_config(config: Any) -> None:
    if not isinstance(config, MemformerConfig):
        raise MemcoreError(
            f"`config` must be a memcore.models.MemformerConfig. Received: {type(config).__name__}"
        )


def _u(key: jax.Array, shape: tuple[int, ...], bound: float, dtype: Any) -> jax.Array:
    return jax.random.uniform(key, shape, dtype=dtype, minval=-bound, maxval=bound)


def _ln_init(dim: int, dtype: Any) -> dict[str, jax.Array]:
    return {"scale": jnp.ones((dim,), dtype), "bias": jnp.zeros((dim,), dtype)}


def init(key: jax.Array, config: MemformerConfig, *, dtype: Any = jnp.float32) -> dict[str, Any]:
    """Parameters drawn as the torch model draws them (not the same numbers).

    Embedding N(0, 1); dense weights and biases U(+-1/sqrt(fan_in)) (``nn.Linear``);
    memory projections and v_bias U(+-sqrt(3/D)) (memcore's modules); LayerNorms 1 and 0.
    """
    _check_config(config)
    c = config
    D, F, C = c.dim, c.ffn_mult * c.dim, c.vocab
    keys = iter(jax.random.split(key, 7 * c.layers + 6))
    lin, mem = 1.0 / math.sqrt(D), math.sqrt(3.0 / D)
    layers = []
    for _ in range(c.layers):
        layers.append({
            "ln_attn": _ln_init(D, dtype),
            "qkv": _u(next(keys), (D, 3 * D), lin, dtype),
            "proj": _u(next(keys), (D, D), lin, dtype),
            "ln_read": _ln_init(D, dtype),
            "read": {n: _u(k, (D, D), mem, dtype)
                     for n, k in zip(("wq", "wk", "wv", "wo"), jax.random.split(next(keys), 4))},
            "ln_ffn": _ln_init(D, dtype),
            "fc1": {"w": _u(next(keys), (D, F), lin, dtype), "b": _u(next(keys), (F,), lin, dtype)},
            "fc2": {"w": _u(next(keys), (F, D), 1.0 / math.sqrt(F), dtype),
                    "b": _u(next(keys), (D,), 1.0 / math.sqrt(F), dtype)},
        })  # fmt: skip
    write = {n: _u(next(keys), (D, D), mem, dtype) for n in ("wq", "wk", "wv")}
    write["v_bias"] = _u(next(keys), (c.slots, D), mem, dtype)
    return {
        "emb": jax.random.normal(next(keys), (C, D), dtype),
        "layers": layers,
        "ln_write": _ln_init(D, dtype),
        "write": write,
        "ln_out": _ln_init(D, dtype),
        "head": _u(next(keys), (D, C), lin, dtype),
    }


def init_memory(params: Mapping[str, Any], batch: int, config: MemformerConfig) -> jax.Array:
    """M_0 = normalize(v_bias) for ``batch`` rows: (B, K, D), differentiable in v_bias."""
    _check_config(config)
    return memory_init(params["write"]["v_bias"], batch_size=batch)


def _ln(x: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + _LN_EPS) * p["scale"] + p["bias"]


def _self_attention(x: jax.Array, p: Mapping[str, Any], heads: int) -> jax.Array:
    """Causal multi-head self-attention (torch's scaled_dot_product_attention, is_causal)."""
    b, n, d = x.shape
    q, k, v = (
        t.reshape(b, n, heads, d // heads).transpose(0, 2, 1, 3)
        for t in jnp.split(_ln(x, p["ln_attn"]) @ p["qkv"], 3, axis=-1)
    )
    s = (q @ jnp.swapaxes(k, -1, -2)) / math.sqrt(d // heads)
    s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -jnp.inf)
    a = jax.nn.softmax(s, axis=-1) @ v
    return a.transpose(0, 2, 1, 3).reshape(b, n, d) @ p["proj"]


def _layer(p: Mapping[str, Any], x: jax.Array, memory: jax.Array, heads: int) -> jax.Array:
    """x += SelfAttn(LN x); x += MemoryRead(LN x, M); x += FFN(LN x): (B, L, D)."""
    x = x + _self_attention(x, p, heads)
    r = p["read"]
    h = _ln(x, p["ln_read"])
    x = x + memory_read(h, memory, r["wq"], r["wk"], r["wv"], r["wo"], num_heads=heads)
    f = jax.nn.gelu(_ln(x, p["ln_ffn"]) @ p["fc1"]["w"] + p["fc1"]["b"], approximate=False)
    return x + f @ p["fc2"]["w"] + p["fc2"]["b"]


def _encode(params: Mapping[str, Any], memory: jax.Array, tokens: jax.Array, c) -> jax.Array:
    x = params["emb"][tokens]
    for lp in params["layers"]:
        x = _layer(lp, x, memory, c.heads)
    return x


def _write(params: Mapping[str, Any], memory: jax.Array, x: jax.Array, c) -> jax.Array:
    w = params["write"]
    h = _ln(x, params["ln_write"])
    return memory_write(
        memory, h, w["wq"], w["wk"], w["wv"], w["v_bias"], num_heads=c.heads, tau=c.tau
    )


def _check_segment(tokens: Any, targets: Any, memory: Any, c: MemformerConfig) -> None:
    for name, t in (("tokens", tokens), ("targets", targets)):
        ok = hasattr(t, "shape") and len(t.shape) == 2
        if not ok or not jnp.issubdtype(jnp.asarray(t).dtype, jnp.integer):
            raise MemcoreError(
                f"`{name}` must be an integer array of shape (B, L). "
                f"Received: {name}.shape={getattr(t, 'shape', type(t).__name__)}"
            )
    if tuple(targets.shape) != tuple(tokens.shape):
        raise MemcoreError(
            f"`targets` must have the tokens' shape (B, L) = {tuple(tokens.shape)}. "
            f"Received: targets.shape={tuple(targets.shape)}"
        )
    want = (tokens.shape[0], c.slots, c.dim)
    if tuple(getattr(memory, "shape", ())) != want:
        raise MemcoreError(
            f"`memory` must have shape (B, K, D) = {want}. "
            f"Received: memory.shape={tuple(getattr(memory, 'shape', ()))}"
        )


def _unpack(segment: Any) -> tuple[Any, Any, Any]:
    if isinstance(segment, Mapping):
        keys = set(segment)
        if not {"tokens", "targets"} <= keys or keys - {"tokens", "targets", "weights"}:
            raise MemcoreError(
                "`segment` must be (tokens, targets) or a mapping with keys tokens, targets "
                f"and optionally weights. Received: keys {sorted(keys)}"
            )
        return segment["tokens"], segment["targets"], segment.get("weights")
    if isinstance(segment, (tuple, list)) and len(segment) == 2:
        return segment[0], segment[1], None
    raise MemcoreError(
        "`segment` must be (tokens, targets) or a mapping with keys tokens, targets "
        f"and optionally weights. Received: {type(segment).__name__}"
    )


def logits(
    params: Mapping[str, Any], memory: jax.Array, tokens: jax.Array, config: MemformerConfig
) -> jax.Array:
    """Next-token logits (B, L, C) of a segment read against memory (B, K, D)."""
    _check_config(config)
    z = _ln(_encode(params, memory, tokens, config), params["ln_out"]) @ params["head"]
    # float32 under bf16/fp16, the parameters' dtype otherwise (as the torch model).
    return z.astype(jnp.float32) if z.dtype in _HALVES else z


def advance(
    params: Mapping[str, Any], memory: jax.Array, tokens: jax.Array, config: MemformerConfig
) -> jax.Array:
    """The memory update alone (no head, no loss): M_{t+1} (B, K, D)."""
    _check_config(config)
    return _write(params, memory, _encode(params, memory, tokens, config), config)


def segment_loss(
    params: Mapping[str, Any], memory: jax.Array, segment: Any, config: MemformerConfig
) -> tuple[jax.Array, jax.Array]:
    """One step: ``(loss, next_memory)`` from memory (B, K, D) and a segment.

    Args:
        params: the pytree of :func:`init`.
        memory: M_t (B, K, D).
        segment: ``(tokens, targets)``, each (B, L) integer ids, or a mapping with keys
            ``tokens``, ``targets`` and optionally ``weights`` (broadcastable to (B, L)).
        config: the model's config (static).

    Returns:
        (loss (), M_{t+1} (B, K, D)): the mean next-token cross-entropy, or
        sum_{b,l} weights[b,l] ce[b,l] when ``weights`` is given.
    """
    _check_config(config)
    tokens, targets, weights = _unpack(segment)
    _check_segment(tokens, targets, memory, config)
    x = _encode(params, memory, tokens, config)
    z = _ln(x, params["ln_out"]) @ params["head"]
    z = z.astype(jnp.float32) if z.dtype in _HALVES else z
    logp = jax.nn.log_softmax(z, axis=-1)
    ce = -jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
    if weights is None:
        loss = jnp.mean(ce)
    else:
        loss = jnp.sum(ce * jnp.broadcast_to(jnp.asarray(weights, ce.dtype), ce.shape))
    return loss, _write(params, memory, x, config)


# ----------------------------------------------------------------------------- torch names
def _ln_names(prefix: str) -> dict[str, tuple[str, ...]]:
    return {f"{prefix}.weight": (prefix, "scale"), f"{prefix}.bias": (prefix, "bias")}


def _layout(config: MemformerConfig) -> dict[str, tuple[tuple[Any, ...], bool]]:
    """torch state_dict name -> (path in the pytree, transposed?)."""
    out: dict[str, tuple[tuple[Any, ...], bool]] = {"emb.weight": (("emb",), False)}
    for i in range(config.layers):
        p = f"layers.{i}"
        for name in ("ln_attn", "ln_read", "ln_ffn"):
            for k, path in _ln_names(name).items():
                out[f"{p}.{k}"] = (("layers", i, *path), False)
        out[f"{p}.qkv.weight"] = (("layers", i, "qkv"), True)
        out[f"{p}.proj.weight"] = (("layers", i, "proj"), True)
        for n in ("wq", "wk", "wv", "wo"):
            out[f"{p}.reader.{n}"] = (("layers", i, "read", n), False)
        for fc in ("fc1", "fc2"):
            out[f"{p}.{fc}.weight"] = (("layers", i, fc, "w"), True)
            out[f"{p}.{fc}.bias"] = (("layers", i, fc, "b"), False)
    for name in ("ln_write", "ln_out"):
        out.update({k: (path, False) for k, path in _ln_names(name).items()})
    for n in ("wq", "wk", "wv", "v_bias"):
        out[f"writer.{n}"] = (("write", n), False)
    out["head.weight"] = (("head",), True)
    return out


def to_flat(params: Mapping[str, Any], config: MemformerConfig) -> dict[str, Any]:
    """The pytree as a flat dict under the torch model's state_dict names and layouts."""
    _check_config(config)
    out = {}
    for name, (path, transposed) in _layout(config).items():
        leaf: Any = params
        for k in path:
            leaf = leaf[k]
        out[name] = leaf.T if transposed else leaf
    return out


def from_flat(flat: Mapping[str, Any], config: MemformerConfig) -> dict[str, Any]:
    """The pytree from a flat dict of arrays (NumPy, JAX, ...) under the torch names, e.g.
    ``{k: v.numpy() for k, v in model.state_dict().items()}``; arrays keep their dtype."""
    _check_config(config)
    layout = _layout(config)
    if set(flat) != set(layout):
        missing, extra = sorted(set(layout) - set(flat)), sorted(set(flat) - set(layout))
        raise MemcoreError(
            f"`flat` must have the torch model's parameter names for this config. "
            f"Received: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    params: dict[str, Any] = {"layers": [{} for _ in range(config.layers)]}
    for name, (path, transposed) in layout.items():
        v = flat[name]
        v = v if isinstance(v, jax.Array) else jnp.asarray(np.asarray(v))
        node: Any = params
        for k in path[:-1]:
            node = node.setdefault(k, {}) if isinstance(node, dict) else node[k]
        node[path[-1]] = v.T if transposed else v
    return params
