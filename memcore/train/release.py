"""Initial parameters of the release-compatible SAB model (issue 14.4; docs/semantics.md,
"Release-compatible mode"): torch's default initialisation, two LSTM biases, the release
scorer's ``w_score`` and no learned head, each selected by its own ``[model]`` key."""

from __future__ import annotations

import numpy as np

from memcore.routing_types import HEAD_PARAM
from memcore.train.config import TrainConfig

__all__ = ["release_params"]


def release_params(
    config: TrainConfig, rng: np.random.Generator, I: int, Hd: int, A: int, O: int
) -> dict[str, np.ndarray]:
    """float64 parameters of a SAB model with any release setting.

    ``init = "release"`` (torch 0.1.12's defaults in the authors' code): LSTMCell weights and
    both biases U(+-1/sqrt(Hd)), no forget-gate bias; output layer ``Linear(2 Hd, O)``:
    v1, v2, b_y U(+-1/sqrt(2 Hd)); scorer ``w_score`` N(0, 0.01^2) (the release's ``w_t``),
    or for memcore's scorer w1, w2 U(+-1/sqrt(Hd)) and w3 N(0, 0.01^2).
    ``init = "memcore"``: memcore's rule (U(+-1/sqrt(fan_in)), forget-gate bias +1,
    b_y = 0), with ``lstm_b_hh`` = 0 (the same forward at step 0) and ``w_score``
    U(+-1/sqrt(2 Hd)). ``head``: head_w (O, C) U(+-1/sqrt(O)) for xent, or none.

    Shapes: lstm_w (I + Hd, 4 Hd), lstm_b, lstm_b_hh (4 Hd,), w_score (2 Hd,) or w1, w2
    (Hd, A), w3 (A,), v1, v2 (Hd, O), b_y (O,).
    """
    model = config.model

    def u(shape: tuple[int, ...], bound: float) -> np.ndarray:
        return rng.uniform(-bound, bound, shape)

    k = 1.0 / np.sqrt(Hd)
    release = model.init == "release"
    if release:
        params = {"lstm_w": u((I + Hd, 4 * Hd), k), "lstm_b": u((4 * Hd,), k)}
        if model.two_biases:
            params["lstm_b_hh"] = u((4 * Hd,), k)
    else:
        bias = u((4 * Hd,), k)
        bias[Hd : 2 * Hd] += 1.0  # memcore: forget gate remembers by default
        params = {"lstm_w": u((I + Hd, 4 * Hd), 1.0 / np.sqrt(I + Hd)), "lstm_b": bias}
        if model.two_biases:
            params["lstm_b_hh"] = np.zeros(4 * Hd)
    if model.score_rule == "release":
        params["w_score"] = (
            rng.normal(0.0, 0.01, 2 * Hd) if release else u((2 * Hd,), k / np.sqrt(2))
        )
    else:
        params["w1"] = u((Hd, A), k)
        params["w2"] = u((Hd, A), k)
        params["w3"] = rng.normal(0.0, 0.01, A) if release else u((A,), 1.0 / np.sqrt(A))
    v = 1.0 / np.sqrt(2 * Hd) if release else k
    params["v1"] = u((Hd, O), v)
    params["v2"] = u((Hd, O), v)
    params["b_y"] = u((O,), v) if release else np.zeros(O)
    if config.task.name != "adding" and model.head:
        from memcore.train.tasks import num_classes

        params[HEAD_PARAM] = u((O, num_classes(config.task)), 1.0 / np.sqrt(O))
    return params
