"""Recurrent cells for the SAB drivers of :mod:`.sab_model`, and the SAB readout.

A cell is any callable ``cell(params, x_t, state) -> (h_hat, state')``:

- ``params``: a mapping of tensors (the cell picks the entries it uses);
- ``x_t``: (B, I); ``state``: the cell's state, either the hidden vector ``h`` (B, Hd)
  itself (GRU, plain RNN) or a tuple whose element 0 is ``h`` (LSTM: ``(h, c)``);
- ``h_hat``: (B, Hd), the provisional hidden state (SAB Alg. 1 line 2).

The SAB drivers add the retrieved summary, ``h = h_hat + s``, and put ``h`` back as
element 0 of ``state'`` (or as the whole state) before the next step, so a cell never
sees the memory. ``lstm`` is memcore's SAB-augmented LSTM cell (the routing drivers'
``SAB_PARAMS`` names); ``gru`` is a GRU in the same convention; :func:`module_cell`
adapts an ``nn.Module`` whose ``forward(x_t, state)`` returns ``(h_hat, state')``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from memcore.backends.torch.lstm import lstm_cell

__all__ = [
    "GRU_PARAMS",
    "LSTM_PARAMS",
    "READOUT_PARAMS",
    "gru",
    "lstm",
    "module_cell",
    "sab_readout",
]

LSTM_PARAMS = ("lstm_w", "lstm_b")
GRU_PARAMS = ("gru_wx", "gru_wh", "gru_bx", "gru_bh")
READOUT_PARAMS = ("v1", "v2", "b_y")

Cell = Callable[[Mapping[str, torch.Tensor], torch.Tensor, Any], tuple[torch.Tensor, Any]]


def lstm(params: Mapping[str, torch.Tensor], x_t: torch.Tensor, state: Any) -> tuple[Any, Any]:
    """memcore's LSTM cell (docs/semantics.md 3.7): state (h, c), each (B, Hd).

    Args:
        params: ``lstm_w`` (I + Hd, 4 Hd), ``lstm_b`` (4 Hd,), gates (i, f, g, o); with
            ``lstm_b_hh`` (4 Hd,) too, the bias is lstm_b + lstm_b_hh (two parameters).
        x_t: (B, I); state: (h, c).

    Returns:
        (h_hat (B, Hd), (h_hat, c')).
    """
    h, c = state
    b = params["lstm_b"]
    if "lstm_b_hh" in params:  # the release's second bias (torch LSTMCell's b_hh)
        b = b + params["lstm_b_hh"]
    h_hat, c_new = lstm_cell(x_t, h, c, params["lstm_w"], b)
    return h_hat, (h_hat, c_new)


def gru(params: Mapping[str, torch.Tensor], x_t: torch.Tensor, h: torch.Tensor) -> tuple[Any, Any]:
    """A GRU cell (torch.nn.GRUCell's equations, gate order r, z, n): state h (B, Hd).

    r = sig(x wx_r + bx_r + h wh_r + bh_r); z likewise; n = tanh(x wx_n + bx_n + r (h wh_n + bh_n));
    h_hat = (1 - z) n + z h.

    Args:
        params: ``gru_wx`` (I, 3 Hd), ``gru_wh`` (Hd, 3 Hd), ``gru_bx``, ``gru_bh`` (3 Hd,).
        x_t: (B, I); h: (B, Hd).

    Returns:
        (h_hat, h_hat).
    """
    gx = torch.addmm(params["gru_bx"], x_t, params["gru_wx"])
    gh = torch.addmm(params["gru_bh"], h, params["gru_wh"])
    xr, xz, xn = gx.chunk(3, dim=-1)
    hr, hz, hn = gh.chunk(3, dim=-1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    h_hat = n + z * (h - n)
    return h_hat, h_hat


def sab_readout(
    params: Mapping[str, torch.Tensor], h: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """y = h v1 + s v2 + b_y (SAB Alg. 1 line 10): h, s (..., Hd) -> (..., O)."""
    return h @ params["v1"] + s @ params["v2"] + params["b_y"]


def module_cell(module: torch.nn.Module, prefix: str = "cell.") -> tuple[Cell, dict[str, Any]]:
    """A functional cell from an ``nn.Module`` whose ``forward(x_t, state)`` returns
    ``(h_hat, state')``.

    Args:
        module: the cell module; its parameters are not copied.
        prefix: the params-dict prefix of the module's parameters.

    Returns:
        (cell, params): ``cell(params, x_t, state)`` calls the module through
        ``torch.func.functional_call`` with ``params[prefix + name]``; ``params`` holds the
        module's own parameters under those names (add the scorer and readout entries).
    """
    names = [n for n, _ in module.named_parameters()]

    def cell(params: Mapping[str, torch.Tensor], x_t: torch.Tensor, state: Any) -> Any:
        own = {n: params[prefix + n] for n in names}
        return torch.func.functional_call(module, own, (x_t, state))

    return cell, {prefix + n: p for n, p in module.named_parameters()}
