"""Seeded in-process task generators: copy, adding, and Memformer segment recall.

Every batch comes from ``numpy.random.default_rng([seed, stream, step])``: the training
batch of step ``s`` is the same whether or not the run was interrupted before it, which is
what makes ``--resume`` continue a run exactly. Arrays are NumPy, float64 inputs and
integer or float64 targets; the trainer casts and moves them to the backend.

Shapes use the glossary: T time steps (segments for recall), B batch, I LSTM input,
L tokens per segment, D width.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np

from memcore.train.config import AddingTask, CopyTask, RecallTask

__all__ = [
    "STREAM_EVAL",
    "STREAM_INIT",
    "STREAM_TRAIN",
    "Batch",
    "baseline",
    "batch_rng",
    "input_size",
    "make_batch",
    "num_classes",
    "recall_table",
    "scored_steps",
    "train_index",
]

STREAM_TRAIN, STREAM_EVAL, STREAM_INIT = 0, 1, 2


@attrs.frozen
class Batch:
    """One batch of a task.

    Attributes:
        xs: (T, B, I) SAB inputs, or (T, B, L, D) Memformer token vectors.
        targets: (T, B) class ids (copy), (T, B, 1) floats (adding), (T, B, L) class ids (recall).
        weights: per-step loss weights (length T): the loss is sum_t weights[t] * l_t.
    """

    xs: np.ndarray
    targets: np.ndarray
    weights: tuple[float, ...]


def batch_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator of batch ``index`` of ``stream`` (train, eval or init) for ``seed``."""
    return np.random.default_rng([int(seed), int(stream), int(index)])


def train_index(run: Any, step: int) -> int:
    """The training-stream batch index of 0-based ``step``: ``step`` itself (a fresh batch
    every step), or with ``run.train_set`` = N a fixed data set of N // batch_size batches
    cycled in order (epoch e repeats epoch 0's batches)."""
    if not run.train_set:
        return step
    return step % (run.train_set // run.batch_size)


def input_size(task: Any) -> int:
    """I for the SAB tasks: 1 (scalar copy), n_symbols + 2 (one-hot copy), 2 (adding)."""
    if isinstance(task, CopyTask):
        return task.n_symbols + 2 if task.one_hot else 1
    if isinstance(task, AddingTask):
        return 2
    raise TypeError(f"input_size is defined for SAB tasks only, not {task.name!r}")


def num_classes(task: Any) -> int:
    """Output classes: blank, the symbols and the marker (copy); the vocabulary (recall); 0
    for the regression adding task."""
    if isinstance(task, CopyTask):
        return task.n_symbols + 2
    if isinstance(task, RecallTask):
        return task.vocab
    return 0


def scored_steps(task: Any, steps: int) -> slice:
    """The steps accuracy and evaluation loss are measured on: the answer region."""
    if isinstance(task, CopyTask):
        return slice(steps - task.n_digits, steps)
    return slice(steps - 1, steps)


def baseline(task: Any) -> dict[str, float]:
    """What a model that learned nothing scores: chance accuracy, or the MSE of predicting
    the mean for adding (Var(s (v1 + v2)) = s^2 / 6 with v ~ U[0, 1))."""
    if isinstance(task, CopyTask):
        return {"accuracy": 1.0 / task.n_symbols, "ce": float(np.log(task.n_symbols))}
    if isinstance(task, RecallTask):
        return {"accuracy": 1.0 / task.vocab, "ce": float(np.log(task.vocab))}
    if task.name == "lm_recall":
        return {"accuracy": 1.0 / task.values, "ce": float(np.log(task.values))}
    return {"mse": task.target_scale**2 / 6.0}


# ----------------------------------------------------------------------------- copy
def copy_batch(task: CopyTask, rng: np.random.Generator, batch: int, T: int | None = None) -> Batch:
    """The release's ``copying_data``: x = [digits, 0 * (T - 1), marker, 0 * n_digits],
    y = [0 * (T + n_digits), digits]; T + 2 n_digits steps in all.

    Returns xs (T', B, I) with I = 1 (the symbol as a float) or n_symbols + 2 (one-hot) and
    targets (T', B) int64, T' = T + 2 n_digits.
    """
    T = task.T if T is None else T
    n = task.n_digits
    steps = T + 2 * n
    digits = rng.integers(1, task.n_symbols + 1, size=(batch, n))
    symbols = np.zeros((steps, batch), dtype=np.int64)
    symbols[:n] = digits.T
    symbols[n + T - 1] = task.n_symbols + 1  # the marker
    targets = np.zeros((steps, batch), dtype=np.int64)
    targets[steps - n :] = digits.T
    if task.one_hot:
        xs = np.eye(task.n_symbols + 2)[symbols]
    else:
        xs = symbols[..., None].astype(np.float64)
    if task.loss_on == "all":
        weights = (1.0 / steps,) * steps
    else:
        weights = (0.0,) * (steps - n) + (1.0 / n,) * n
    return Batch(xs, targets, weights)


# ----------------------------------------------------------------------------- adding
def adding_batch(
    task: AddingTask, rng: np.random.Generator, batch: int, T: int | None = None
) -> Batch:
    """Values in [0, 1) with one marked entry in [0, T/2) and one in [T/2, T).

    Returns xs (T, B, 2) (value, marker) and targets (T, B, 1): target_scale * (v1 + v2) at
    the last step (the only step with a non-zero loss weight), 0 elsewhere.
    """
    T = task.T if T is None else T
    half = T // 2
    values = rng.random((T, batch))
    first = rng.integers(0, half, size=batch)
    second = rng.integers(half, T, size=batch)
    marks = np.zeros((T, batch))
    rows = np.arange(batch)
    marks[first, rows] = 1.0
    marks[second, rows] = 1.0
    xs = np.stack([values, marks], axis=-1)
    targets = np.zeros((T, batch, 1))
    targets[-1, :, 0] = task.target_scale * (values[first, rows] + values[second, rows])
    return Batch(xs, targets, (0.0,) * (T - 1) + (1.0,))


# ----------------------------------------------------------------------------- recall
def recall_table(task: RecallTask, dim: int) -> dict[str, np.ndarray]:
    """The fixed token table of width D, drawn from ``task.table_seed``: content (V, D),
    position (L, D), query (D,), blank (D,); entries N(0, 1 / D) so vectors have norm ~1."""
    rng = np.random.default_rng([int(task.table_seed), 7919])
    scale = 1.0 / np.sqrt(dim)
    return {
        "content": rng.normal(0.0, scale, (task.vocab, dim)),
        "position": rng.normal(0.0, scale, (task.items, dim)),
        "query": rng.normal(0.0, scale, (dim,)),
        "blank": rng.normal(0.0, scale, (dim,)),
    }


def recall_batch(task: RecallTask, rng: np.random.Generator, batch: int, dim: int) -> Batch:
    """Segment 0 shows content[v_i] + position[i] for i < L; segments 1..S-1 show
    distractors (noise tokens content[u] + position[i], or the blank vector); segment S
    shows query + position[i] and must answer v_i.

    Returns xs (S + 1, B, L, D) and targets (S + 1, B, L) int64 (0 except at the last
    segment, the only one with a non-zero loss weight).
    """
    table = recall_table(task, dim)
    S, L = task.segments, task.items
    items = rng.integers(0, task.vocab, size=(batch, L))
    xs = np.empty((S + 1, batch, L, dim))
    xs[0] = table["content"][items] + table["position"]
    for s in range(1, S):
        if task.distractors == "noise":
            noise = rng.integers(0, task.vocab, size=(batch, L))
            xs[s] = table["content"][noise] + table["position"]
        else:
            xs[s] = table["blank"]
    xs[S] = table["query"] + table["position"]
    targets = np.zeros((S + 1, batch, L), dtype=np.int64)
    targets[S] = items
    return Batch(xs, targets, (0.0,) * S + (1.0,))


def make_batch(
    task: Any, rng: np.random.Generator, batch: int, *, dim: int = 0, T: int | None = None
) -> Batch:
    """A batch of ``task`` from ``rng``; ``T`` overrides the copy/adding length (transfer),
    ``dim`` is the Memformer width D (recall only)."""
    if isinstance(task, CopyTask):
        return copy_batch(task, rng, batch, T)
    if isinstance(task, AddingTask):
        return adding_batch(task, rng, batch, T)
    if task.name == "lm_recall":  # the Memformer LM's task: memcore/train/lm_task.py
        from memcore.train.lm_task import lm_recall_batch

        return lm_recall_batch(task, rng, batch)
    return recall_batch(task, rng, batch, dim)
