"""Measuring a model: metrics on its answer steps, the held-out evaluation, the curves plot.

Outputs come from :func:`memcore.train.model.forward_outputs` (the backend's own ops, so it
runs where training runs); metrics are computed in NumPy from the answer steps only: the
last n_digits steps (copy) or the last step (adding, recall).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from memcore.train.config import TrainConfig
from memcore.train.model import forward_outputs, sab_state0
from memcore.train.plot import Panel, Series, plot_curves
from memcore.train.tasks import STREAM_EVAL, Batch, baseline, batch_rng, make_batch, scored_steps

__all__ = ["batch_metrics", "evaluate", "plot_history", "score"]


def score(task: Any, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Metrics on the scored steps: accuracy and cross-entropy (copy, recall) or MSE (adding).

    Args:
        outputs: logits (n, B, C) / (n, B, L, C), or y (n, B, 1) for adding.
        targets: class ids (n, B) / (n, B, L), or floats (n, B, 1).
    """
    if task.name == "adding":
        return {"mse": float(np.mean((outputs[..., :1] - targets) ** 2))}
    z = outputs.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(logp, targets[..., None].astype(np.int64), axis=-1)[..., 0]
    return {
        "accuracy": float(np.mean(outputs.argmax(axis=-1) == targets)),
        "ce": float(-picked.mean()),
    }


def evaluate(
    backend: Any,
    device: str | None,
    dtype: str,
    config: TrainConfig,
    params: Mapping[str, Any],
    T: int | None = None,
) -> dict[str, float]:
    """Metrics on the held-out set: run.eval_size sequences of the eval stream, at length T
    (the task's own T when None; copy and adding only), batch by batch on the backend."""
    run = config.run
    sums: dict[str, float] = {}
    done, index = 0, 0
    while done < run.eval_size:
        size = min(run.eval_batch, run.eval_size - done)
        batch = make_batch(
            config.task,
            batch_rng(run.seed, STREAM_EVAL, index),
            size,
            dim=getattr(config.model, "dim", 0),
            T=T,
        )
        metrics = batch_metrics(backend, device, dtype, config, params, batch)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v * size
        done, index = done + size, index + 1
    return {k: v / run.eval_size for k, v in sums.items()}


def batch_metrics(
    backend: Any,
    device: str | None,
    dtype: str,
    config: TrainConfig,
    params: Mapping[str, Any],
    batch: Batch,
) -> dict[str, float]:
    """score() of the model's outputs on ``batch`` (its answer steps), computed on the backend."""
    be = backend
    xs = be.from_numpy(batch.xs, dtype=dtype, device=device)
    steps, B = batch.xs.shape[0], batch.xs.shape[1]
    state0 = None
    if config.model.kind == "sab":
        state0 = sab_state0(be, B, config.model.hidden, dtype, device)
    scored = scored_steps(config.task, steps)
    outputs = forward_outputs(be, config, params, xs, scored, state0)
    return score(config.task, outputs, batch.targets[scored])


def plot_history(
    path: pathlib.Path,
    config: TrainConfig,
    history: dict[str, Any],
    final: dict[str, float],
    done: int,
) -> None:
    """curves.png: training loss (and eval CE) on top; train/eval accuracy (or MSE) below,
    against chance (or the predict-the-mean MSE)."""
    blue, red, gray = (31, 90, 200), (210, 50, 40), (150, 150, 150)
    evals = history["eval"] + [{"step": done, **final}]
    base = baseline(config.task)
    key = "accuracy" if "accuracy" in final else "mse"
    loss_series = [Series("TRAIN LOSS", history["step"], history["loss"], blue)]
    if key == "accuracy":
        loss_series.append(
            Series("EVAL CE", [e["step"] for e in evals], [e["ce"] for e in evals], red)
        )
    metric = [
        Series(
            f"TRAIN {key}",
            [e["step"] for e in history["train"]],
            [e[key] for e in history["train"]],
            blue,
        ),
        Series(f"EVAL {key}", [e["step"] for e in evals], [e[key] for e in evals], red),
        Series(
            "CHANCE" if key == "accuracy" else "BASELINE", [0, max(done, 1)], [base[key]] * 2, gray
        ),
    ]
    rng = (0.0, 1.0) if key == "accuracy" else None
    plot_curves(path, [Panel("LOSS", loss_series), Panel(key.upper(), metric, rng)])
