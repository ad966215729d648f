"""The LSTM cell SAB is built on, with its hand-written backward.

Shapes: x (B, I); h, c (B, Hd); w (I + Hd, 4 Hd); b (4 Hd,). Gate order (i, f, g, o).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from memcore.reference._xp import array_namespace, concat, mT

__all__ = ["lstm_cell_forward", "lstm_cell_backward", "sigmoid"]


def sigmoid(xp, z):
    """Logistic function written to avoid overflow in exp for large |z|."""
    e = xp.exp(-xp.abs(z))
    return xp.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


class LstmCache(NamedTuple):
    xh: Any  # (B, I + Hd)
    c: Any  # (B, Hd) incoming cell
    w: Any
    i: Any
    f: Any
    g: Any
    o: Any  # gate activations, (B, Hd) each
    tc: Any  # tanh(c')


def lstm_cell_forward(x, h, c, w, b):
    """One LSTM step: z = [x, h] w + b split into (i, f, g, o);
    c' = sig(f) c + sig(i) tanh(g); h_hat = sig(o) tanh(c').

    Returns:
        ((h_hat, c'), cache), both (B, Hd).
    """
    xp = array_namespace(x)
    hd = h.shape[-1]
    xh = concat(xp, [x, h], axis=-1)
    z = xp.matmul(xh, w) + b
    i = sigmoid(xp, z[:, :hd])
    f = sigmoid(xp, z[:, hd : 2 * hd])
    g = xp.tanh(z[:, 2 * hd : 3 * hd])
    o = sigmoid(xp, z[:, 3 * hd :])
    c_new = f * c + i * g
    tc = xp.tanh(c_new)
    return (o * tc, c_new), LstmCache(xh, c, w, i, f, g, o, tc)


def lstm_cell_backward(cache: LstmCache, grad_out):
    """(dx, dh, dc, dw, db) from (dh_hat, dc').

    dc'_total = dc' + dh_hat o (1 - tanh(c')^2); do = dh_hat tanh(c');
    df = dc'_total c; di = dc'_total g; dg = dc'_total i; dc = dc'_total f;
    dz = [di i(1-i), df f(1-f), dg (1-g^2), do o(1-o)];
    d[x, h] = dz w^T; dw = [x, h]^T dz; db = sum_b dz.
    """
    dh_hat, dc_new = grad_out
    k = cache
    xp = array_namespace(dh_hat)
    dct = dc_new + dh_hat * k.o * (1.0 - k.tc * k.tc)
    dz = concat(
        xp,
        [
            dct * k.g * k.i * (1.0 - k.i),
            dct * k.c * k.f * (1.0 - k.f),
            dct * k.i * (1.0 - k.g * k.g),
            dh_hat * k.tc * k.o * (1.0 - k.o),
        ],
        axis=-1,
    )
    dxh = xp.matmul(dz, mT(xp, k.w))
    n_in = k.xh.shape[-1] - dh_hat.shape[-1]
    return (
        dxh[:, :n_in],
        dxh[:, n_in:],
        dct * k.f,
        xp.matmul(mT(xp, k.xh), dz),
        xp.sum(dz, axis=0),
    )
