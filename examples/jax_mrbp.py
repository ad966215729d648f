"""Train your own memory model with MRBP in JAX: two stacked memories recall a token."""
import os

import jax

from memcore.backends.jax import modules as mm
from memcore.backends.jax.mrbp_model import mrbp

V, D, K, H, T, L, B = 8, 16, 4, 2, 6, 4, 32  # vocab, width, slots, heads, segments, tokens, batch

def init(k):  # the parameters: a plain pytree (nested dicts and lists of arrays)
    k = jax.random.split(k, 6)
    return {"embed": jax.random.normal(k[0], (V, D)), "head": jax.random.normal(k[1], (D, V)) / 4,
            "read": [mm.init_reader(k[2], D), mm.init_reader(k[3], D)],
            "write": [mm.init_writer(k[4], K, D), mm.init_writer(k[5], K, D)]}


def memory0(p, batch=B):  # M_0 from each writer's v_bias: (B, K, D) twice
    return [mm.writer_initial_memory(w, batch) for w in p["write"]]


def step(p, memory, seg):  # step(params, memory, segment) -> (loss, next memory)
    h, new = p["embed"][seg["tokens"]], []
    for r, w, m in zip(p["read"], p["write"], memory):  # two stacked memory layers
        h = h + mm.reader(r, h, m, num_heads=H)  # read memory i, then write it from h
        new.append(mm.writer(w, m, h, num_heads=H))
    logp = jax.nn.log_softmax(h @ p["head"])
    return -(logp * jax.nn.one_hot(seg["targets"], V)).sum(-1).mean(), new


if __name__ == "__main__":
    params = init(jax.random.PRNGKey(0))
    for i in range(int(os.environ.get("STEPS", "200"))):  # mrbp is jitted: one compile
        x = jax.random.randint(jax.random.PRNGKey(i + 1), (T, B, L), 0, V)  # T segments, L tokens
        x = {"tokens": x.at[0].set(x[0, :, :1]), "targets": x[:1, :, :1].repeat(T, 0)}  # recall
        loss, grads, _ = mrbp(step, params, memory0, x)
        params = jax.tree.map(lambda w, g: w - 0.01 * jax.numpy.sign(g), params, grads)  # signSGD
        if i % 20 == 0:
            print(f"step {i:4d}  loss per segment {loss / T:.3f}")
