"""Recurrent cells and readouts for the SAB drivers of :mod:`memcore.backends.jax.sab_model`.

A cell is a pure function ``cell(params, x_t, (h, aux)) -> (h_hat, aux')``: ``h`` (B, Hd)
is the SAB hidden state (the previous step's ``h_hat + s``), ``aux`` any pytree the cell
carries besides it (the LSTM's ``c``; ``()`` for a GRU), ``h_hat`` the provisional hidden
state the retrieval is added to. A readout ``readout(params, h, s) -> y_t`` maps the
step's final ``h`` and its read ``s`` to the output. ``params`` is one pytree for the
whole model (a dict here), shared by the cell, the readout and the scorer.

* LSTM (memcore's SAB cell, SAB Alg. 1 line 2): :func:`lstm_cell_fn`, params lstm_w
  (I+Hd, 4Hd), lstm_b (4Hd,); state (h, c).
* GRU: :func:`gru_cell_fn`, params gru_wx (I, 3Hd), gru_wh (Hd, 3Hd), gru_b (3Hd,);
  state (h, ()). :func:`init_gru_params` draws them.
* :func:`linear_readout`: y = h v1 + s v2 + b_y (v1, v2 (Hd, O), b_y (O,)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from memcore.backends.jax.lstm import lstm_cell

__all__ = ["gru_cell_fn", "init_gru_params", "linear_readout", "lstm_cell_fn"]

Params = Mapping[str, Any]


def lstm_cell_fn(params: Params, x: jax.Array, state: tuple[jax.Array, jax.Array]):
    """memcore's LSTM (docs/semantics.md 3.7): x (B, I), state (h, c) -> (h_hat, c')."""
    h, c = state
    b = params["lstm_b"]
    if "lstm_b_hh" in params:  # the release's second bias (torch LSTMCell's b_hh)
        b = b + params["lstm_b_hh"]
    return lstm_cell(x, h, c, params["lstm_w"], b)


def gru_cell_fn(params: Params, x: jax.Array, state: tuple[jax.Array, Any]):
    """A GRU (Cho et al. 2014, gates r, z, candidate n): x (B, I), state (h, ()) -> (h_hat, ()).

    r = sig(x Wr + h Ur + br); z = sig(x Wz + h Uz + bz); n = tanh(x Wn + r (h Un) + bn);
    h_hat = (1 - z) n + z h.
    """
    h, _ = state
    hd = h.shape[-1]
    gx = x @ params["gru_wx"] + params["gru_b"]
    gh = h @ params["gru_wh"]
    r = jax.nn.sigmoid(gx[:, :hd] + gh[:, :hd])
    z = jax.nn.sigmoid(gx[:, hd : 2 * hd] + gh[:, hd : 2 * hd])
    n = jnp.tanh(gx[:, 2 * hd :] + r * gh[:, 2 * hd :])
    return (1.0 - z) * n + z * h, ()


def init_gru_params(key: jax.Array, input_size: int, hidden: int, *, dtype=jnp.float32):
    """gru_wx (I, 3Hd), gru_wh (Hd, 3Hd), gru_b (3Hd,), each U(+-1/sqrt(Hd))."""
    ks = jax.random.split(key, 3)
    bound = 1.0 / math.sqrt(hidden)

    def u(k, shape):
        return jax.random.uniform(k, shape, dtype=dtype, minval=-bound, maxval=bound)

    return {
        "gru_wx": u(ks[0], (input_size, 3 * hidden)),
        "gru_wh": u(ks[1], (hidden, 3 * hidden)),
        "gru_b": u(ks[2], (3 * hidden,)),
    }


def linear_readout(params: Params, h: jax.Array, s: jax.Array) -> jax.Array:
    """y_t = h v1 + s v2 + b_y: (B, O) (memcore's SAB output, docs/semantics.md R.1)."""
    return h @ params["v1"] + s @ params["v2"] + params["b_y"]
