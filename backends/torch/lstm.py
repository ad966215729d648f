"""The LSTM cell SAB is built on, in native torch ops.

Shapes: x (B, I); h, c (B, Hd); w (I + Hd, 4 Hd); b (4 Hd,). Gate order (i, f, g, o).
"""

from __future__ import annotations

import torch

from memcore.backends.torch._common import half_safe

__all__ = ["lstm_cell"]


@half_safe
def lstm_cell(x, h, c, w, b) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step: z = [x, h] w + b split into (i, f, g, o);
    c' = sig(f) c + sig(i) tanh(g); h_hat = sig(o) tanh(c').

    Args:
        x: (B, I); h, c: (B, Hd); w: (I + Hd, 4 Hd); b: (4 Hd,).

    Returns:
        (h_hat, c'), both (B, Hd).
    """
    z = torch.addmm(b, torch.cat([x, h], dim=-1), w)
    zi, zf, zg, zo = z.chunk(4, dim=-1)
    c_new = torch.sigmoid(zf) * c + torch.sigmoid(zi) * torch.tanh(zg)
    return torch.sigmoid(zo) * torch.tanh(c_new), c_new
