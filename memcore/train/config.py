"""The training config: frozen attrs records read from a TOML file.

A config file has five sections; every key is checked (an unknown one is an error that
lists the allowed keys) and every value is validated before anything is trained::

    [task]     name = "copy" | "adding" | "recall" | "lm_recall", and the task's own keys
    [model]    kind = "sab" | "memformer" | "memformer_lm", and the model's own keys
    [routing]  method = "bptt" | "tbptt" | "sab_bptt" | "sparse_replay" | "mrbp"
    [optim]    Adam and gradient clipping
    [run]      steps, batch size, seed, dtype, logging, checkpoints, evaluation

Which routing a model can use is checked here too (see :data:`ROUTINGS`), so a config
that cannot train fails at load time, before a backend is even imported.
"""

from __future__ import annotations

import pathlib
from typing import Any

import attrs
import tomllib

from memcore.errors import MemcoreError
from memcore.train._validators import bool_, int_min, lengths, one_of, path_, real, to_tuple
from memcore.train.lm_config import LMRecallTask, MemformerLMModel

__all__ = [
    "ROUTINGS",
    "AddingTask",
    "CopyTask",
    "MemformerModel",
    "OptimConfig",
    "RecallTask",
    "RoutingConfig",
    "RunConfig",
    "SabModel",
    "TrainConfig",
    "load_config",
    "parse_config",
]

# The routing methods each model kind can be trained with.
ROUTINGS = {
    "sab": ("bptt", "sab_bptt", "sparse_replay", "tbptt"),
    "memformer": ("bptt", "mrbp"),
    "memformer_lm": ("bptt", "mrbp"),
}


# ----------------------------------------------------------------------------- tasks
@attrs.frozen
class CopyTask:
    """The copy task of the SAB paper and its release (``copying_data``).

    The sequence has T + 2 n_digits steps: n_digits symbols drawn from 1..n_symbols, T - 1
    blanks (0), the marker (n_symbols + 1), n_digits blanks. Targets are blank (class 0)
    except on the last n_digits steps, which must reproduce the symbols.

    Attributes:
        T: the delay between the last symbol and the first answer (T - 1 blanks + marker).
        n_digits: symbols to copy (10 in the paper).
        n_symbols: alphabet size (8 in the paper; chance accuracy is 1 / n_symbols).
        one_hot: one-hot input of width n_symbols + 2, instead of the release's scalar.
        loss_on: "all" (the release: mean cross-entropy over all positions) or "last"
            (mean over the last n_digits positions only).
        transfer_T: longer delays to evaluate the final model at (the transfer test).
    """

    T: int = attrs.field(validator=int_min(1))
    n_digits: int = attrs.field(default=10, validator=int_min(1))
    n_symbols: int = attrs.field(default=8, validator=int_min(2))
    one_hot: bool = attrs.field(default=False, validator=bool_)
    loss_on: str = attrs.field(default="all", validator=one_of("all", "last"))
    transfer_T: tuple[int, ...] = attrs.field(default=(), converter=to_tuple, validator=lengths)
    name: str = attrs.field(default="copy", init=False)


@attrs.frozen
class AddingTask:
    """The adding task as in the SAB team's script: 2-D input (value in [0, 1), marker).

    One marker falls in [0, T/2) and one in [T/2, T); the target, read from the output
    at the last step only (MSE), is target_scale * (v1 + v2).

    Attributes:
        T: sequence length (>= 2).
        target_scale: 0.5 for the SAB team's (v1 + v2) / 2, 1.0 for the plain sum.
    """

    T: int = attrs.field(validator=int_min(2))
    target_scale: float = attrs.field(default=0.5, validator=real(0.0, low_open=True))
    name: str = attrs.field(default="adding", init=False)


@attrs.frozen
class RecallTask:
    """Memformer segment recall: tokens of segment 1 must be produced after S segments.

    The rollout has segments + 1 steps, one segment of ``items`` tokens each. Step 0 shows
    ``items`` tokens drawn from a vocabulary of ``vocab``; steps 1..segments-1 are
    distractors; the last step shows queries (one per position) and must output the
    class ids shown at step 0. Tokens are vectors from a fixed table drawn from
    ``table_seed``; answers are class ids read through the ``head_w`` head.

    Attributes:
        segments: S, the number of segments between the items and their recall.
        items: L, tokens per segment (= items to remember).
        vocab: V, token classes (chance accuracy is 1 / V).
        distractors: "noise" (random vocabulary tokens) or "blank" (one blank vector).
        table_seed: seed of the embedding table (fixed for a task, whatever the run seed).
    """

    segments: int = attrs.field(validator=int_min(1))
    items: int = attrs.field(default=4, validator=int_min(1))
    vocab: int = attrs.field(default=8, validator=int_min(2))
    distractors: str = attrs.field(default="noise", validator=one_of("noise", "blank"))
    table_seed: int = attrs.field(default=0, validator=int_min(0))
    name: str = attrs.field(default="recall", init=False)


# ----------------------------------------------------------------------------- models
@attrs.frozen
class SabModel:
    """An LSTM with SAB sparse attention over its past hidden states (SAB Alg. 1).

    Attributes:
        hidden: Hd, the LSTM width.
        scorer: A, the width of the attention scorer (w1, w2: (Hd, A), w3: (A,)).
        k_top, k_att, eps, threshold_grad, block_score_grad, include_h0_memory: as in
            :class:`memcore.SABConfig`.
        memory: false turns the model into a plain LSTM (nothing is ever written, so
            every read sees an empty memory and retrieves s = 0).
        out_dim: O, the width of y_t; 0 means the task's (classes for copy, 1 for adding).
        score_rule, sparsify: SABConfig's ``scorer`` and ``sparsify`` ("memcore" or
            "release"; the release scorer has one parameter w_score (2 Hd,)).
        init: "memcore" (U(+-1/sqrt(fan_in)), forget-gate bias +1, b_y = 0) or "release"
            (torch's defaults: LSTMCell U(+-1/sqrt(Hd)) everywhere, no forget-gate bias,
            the output layer U(+-1/sqrt(2 Hd)); scorer weights N(0, 0.01)).
        two_biases: the LSTM has b_ih and b_hh (lstm_b, lstm_b_hh), as torch's LSTMCell;
            both get the same gradient, so the bias moves twice as fast under Adam.
        head: a learned head_w (O, C) maps y to the logits; false: y itself (O = C) gives
            the logits, as the release's output layer does (copy task only).
        (docs/semantics.md, "Release-compatible mode".)
    """

    hidden: int = attrs.field(default=128, validator=int_min(1))
    scorer: int = attrs.field(default=0, validator=int_min(0))
    k_top: int = attrs.field(default=5, validator=int_min(1))
    k_att: int = attrs.field(default=2, validator=int_min(1))
    eps: float = attrs.field(default=1e-7, validator=real(0.0))
    threshold_grad: bool = attrs.field(default=False, validator=bool_)
    block_score_grad: bool = attrs.field(default=False, validator=bool_)
    include_h0_memory: bool = attrs.field(default=False, validator=bool_)
    memory: bool = attrs.field(default=True, validator=bool_)
    out_dim: int = attrs.field(default=0, validator=int_min(0))
    score_rule: str = attrs.field(default="memcore", validator=one_of("memcore", "release"))
    sparsify: str = attrs.field(default="memcore", validator=one_of("memcore", "release"))
    init: str = attrs.field(default="memcore", validator=one_of("memcore", "release"))
    two_biases: bool = attrs.field(default=False, validator=bool_)
    head: bool = attrs.field(default=True, validator=bool_)
    kind: str = attrs.field(default="sab", init=False)


@attrs.frozen
class MemformerModel:
    """The Memformer memory cell (memory_read, residual, memory_write) and a class head.

    Attributes:
        dim: D, token and slot width (the task's embedding table has this width).
        slots: K, memory slots.
        heads: H, attention heads (D must be divisible by H).
        tau: write temperature in (0, 1].
    """

    dim: int = attrs.field(default=32, validator=int_min(1))
    slots: int = attrs.field(default=8, validator=int_min(1))
    heads: int = attrs.field(default=2, validator=int_min(1))
    tau: float = attrs.field(default=0.25, validator=real(0.0, 1.0, low_open=True))
    kind: str = attrs.field(default="memformer", init=False)

    def __attrs_post_init__(self) -> None:
        if self.dim % self.heads:
            raise MemcoreError(
                f"`dim` must be divisible by `heads` ({self.heads}). Received: dim={self.dim}"
            )


# ----------------------------------------------------------------------------- the rest
@attrs.frozen
class RoutingConfig:
    """How gradients travel through time.

    Attributes:
        method: "bptt" (full BPTT, every step kept), "sab_bptt" (SAB, chunked truncation,
            whole graph), "sparse_replay" (SAB, same gradient from chunk boundaries),
            "tbptt" (plain LSTM truncated BPTT: sab_bptt of a model with memory = false),
            "mrbp" (Memformer Alg. 1).
        k_trunc: chunk length for sab_bptt, sparse_replay and tbptt (required there,
            rejected elsewhere); 0 = unset.
        truncate_every: Memformer only: cut the memory gradient every k steps; 0 = never.
        truncation: SAB chunks: "memcore" (cuts entering 1-based steps 1 + m k_trunc) or
            "release" (entering 0-based steps k_trunc - 1, 2 k_trunc - 1, ...).
    """

    method: str = attrs.field(
        validator=one_of("bptt", "sab_bptt", "sparse_replay", "tbptt", "mrbp")
    )
    k_trunc: int = attrs.field(default=0, validator=int_min(0))
    truncate_every: int = attrs.field(default=0, validator=int_min(0))
    truncation: str = attrs.field(default="memcore", validator=one_of("memcore", "release"))


@attrs.frozen
class OptimConfig:
    """Adam (Kingma & Ba) with global-norm gradient clipping (``clip_norm`` 0 = off)."""

    lr: float = attrs.field(default=1e-3, validator=real(0.0, low_open=True))
    beta1: float = attrs.field(default=0.9, validator=real(0.0, 1.0))
    beta2: float = attrs.field(default=0.999, validator=real(0.0, 1.0))
    eps: float = attrs.field(default=1e-8, validator=real(0.0, low_open=True))
    clip_norm: float = attrs.field(default=1.0, validator=real(0.0))

    def __attrs_post_init__(self) -> None:
        for name in ("beta1", "beta2"):
            if getattr(self, name) >= 1.0:
                raise MemcoreError(
                    f"`{name}` must be in [0, 1). Received: {name}={getattr(self, name)!r}"
                )


@attrs.frozen
class RunConfig:
    """The loop: steps, batch size, seed, float dtype, logging, checkpoints, evaluation.

    Attributes:
        steps: optimizer steps in the whole run (a resumed run continues up to it).
        batch_size: B, sequences per step.
        seed: seeds parameters, training batches (keyed by (seed, step)) and the eval set.
        dtype: "float32" or "float64".
        log_every: steps between train-accuracy measurements and progress lines.
        checkpoint_every: steps between checkpoints (0 = only at the end).
        eval_every: steps between evaluations on the held-out set (0 = only at the end).
        eval_size: held-out sequences (drawn once from the seed).
        eval_batch: sequences per evaluation batch.
        threads: CPU threads for torch (0 = leave the framework's default).
        out: default output folder (``--out`` overrides it).
        train_set: 0: every step draws a fresh batch; N: a fixed data set of N sequences
            (N // batch_size batches, cycled in order, as the release's 640,000).
    """

    steps: int = attrs.field(validator=int_min(1))
    batch_size: int = attrs.field(default=64, validator=int_min(1))
    seed: int = attrs.field(default=0, validator=int_min(0))
    dtype: str = attrs.field(default="float32", validator=one_of("float32", "float64"))
    log_every: int = attrs.field(default=10, validator=int_min(1))
    checkpoint_every: int = attrs.field(default=0, validator=int_min(0))
    eval_every: int = attrs.field(default=0, validator=int_min(0))
    eval_size: int = attrs.field(default=512, validator=int_min(1))
    eval_batch: int = attrs.field(default=128, validator=int_min(1))
    threads: int = attrs.field(default=0, validator=int_min(0))
    out: str = attrs.field(default="runs/train", validator=path_)
    train_set: int = attrs.field(default=0, validator=int_min(0))


_TASKS = {"copy": CopyTask, "adding": AddingTask, "recall": RecallTask, "lm_recall": LMRecallTask}
_MODELS = {"sab": SabModel, "memformer": MemformerModel, "memformer_lm": MemformerLMModel}
_TASK_MODEL = {
    "copy": "sab",
    "adding": "sab",
    "recall": "memformer",
    "lm_recall": "memformer_lm",
}
_SECTIONS = ("task", "model", "routing", "optim", "run")


@attrs.frozen
class TrainConfig:
    """A whole training run; the cross-section rules are checked on construction."""

    task: CopyTask | AddingTask | RecallTask | LMRecallTask
    model: SabModel | MemformerModel | MemformerLMModel
    routing: RoutingConfig
    optim: OptimConfig
    run: RunConfig

    def __attrs_post_init__(self) -> None:
        want = _TASK_MODEL[self.task.name]
        if self.model.kind != want:
            raise MemcoreError(
                f"`model.kind` must be {want!r} for task {self.task.name!r}. "
                f"Received: kind={self.model.kind!r}"
            )
        method, allowed = self.routing.method, ROUTINGS[self.model.kind]
        if method not in allowed:
            raise MemcoreError(
                f"`routing.method` must be one of {', '.join(allowed)} for model "
                f"{self.model.kind!r}. Received: method={method!r}"
            )
        truncated = method in ("sab_bptt", "sparse_replay", "tbptt")
        if truncated and self.routing.k_trunc == 0:
            raise MemcoreError(
                f"`routing.k_trunc` must be set (>= 1) for method {method!r}. "
                "Received: k_trunc unset"
            )
        if not truncated and self.routing.k_trunc:
            raise MemcoreError(
                f"`routing.k_trunc` must be unset for method {method!r} (it truncates nothing "
                f"there). Received: k_trunc={self.routing.k_trunc}"
            )
        if self.run.train_set and self.run.train_set < self.run.batch_size:
            raise MemcoreError(
                f"`run.train_set` must be 0 or at least batch_size ({self.run.batch_size}). "
                f"Received: train_set={self.run.train_set}"
            )
        if self.routing.truncate_every and self.model.kind not in ("memformer", "memformer_lm"):
            raise MemcoreError(
                "`routing.truncate_every` must be unset for model 'sab' (it is Memformer's). "
                f"Received: truncate_every={self.routing.truncate_every}"
            )
        if isinstance(self.model, SabModel):
            if method == "tbptt" and self.model.memory:
                raise MemcoreError(
                    "`model.memory` must be false for routing 'tbptt' (a plain LSTM trained "
                    "with truncated BPTT; SAB with truncation is 'sparse_replay' or 'sab_bptt'). "
                    "Received: memory=true"
                )
            if not self.model.head and (self.task.name != "copy" or self.model.out_dim):
                raise MemcoreError(
                    "`model.head` may be false only for task 'copy' with out_dim unset "
                    "(y gives the logits). Received: head=false"
                )
            if method in ("sab_bptt", "sparse_replay") and not self.model.memory:
                raise MemcoreError(
                    f"`model.memory` must be true for routing {method!r} (use 'tbptt' for a "
                    "plain LSTM). Received: memory=false"
                )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The config as TOML-ready sections (what :func:`parse_config` reads back)."""
        out: dict[str, dict[str, Any]] = {}
        for section in _SECTIONS:
            record = getattr(self, section)
            values = attrs.asdict(record, recurse=False)
            for key, value in values.items():
                if isinstance(value, tuple):
                    values[key] = list(value)
            out[section] = values
        return out


def _build(cls: type, section: str, table: dict[str, Any], label: str) -> Any:
    fields = {a.name: a for a in attrs.fields(cls)}
    allowed = sorted(n for n, a in fields.items() if a.init)
    for key in table:
        if key not in allowed:
            raise MemcoreError(
                f"Unknown key `{key}` in [{section}]{label}. Allowed: {', '.join(allowed)}"
            )
    missing = [n for n in allowed if fields[n].default is attrs.NOTHING and n not in table]
    if missing:
        raise MemcoreError(
            f"`{section}.{missing[0]}` must be given in [{section}]{label}. Received: no value"
        )
    return cls(**table)


def _pick(
    section: str, table: dict[str, Any], key: str, registry: dict[str, type]
) -> tuple[type, dict[str, Any]]:
    rest = dict(table)
    choice = rest.pop(key, None)
    if not isinstance(choice, str) or choice not in registry:
        raise MemcoreError(
            f"`{section}.{key}` must be one of {', '.join(repr(k) for k in registry)}. "
            f"Received: {key}={choice!r}"
        )
    return registry[choice], rest


def parse_config(data: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from parsed TOML (a dict of sections).

    Raises:
        MemcoreError: an unknown or missing section or key, or a bad value.
    """
    if not isinstance(data, dict):
        raise MemcoreError(f"`config` must be a table of sections. Received: {type(data).__name__}")
    for section in data:
        if section not in _SECTIONS:
            raise MemcoreError(f"Unknown section [{section}]. Allowed: {', '.join(_SECTIONS)}")
    tables = {}
    for section in _SECTIONS:
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise MemcoreError(f"`{section}` must be a [{section}] table. Received: {table!r}")
        tables[section] = table
    for section in ("task", "model", "routing", "run"):
        if section not in data:
            raise MemcoreError(
                f"`config` must have a [{section}] section. Received: no [{section}]"
            )
    task_cls, task_table = _pick("task", tables["task"], "name", _TASKS)
    model_cls, model_table = _pick("model", tables["model"], "kind", _MODELS)
    return TrainConfig(
        task=_build(task_cls, "task", task_table, f" (task {tables['task']['name']!r})"),
        model=_build(model_cls, "model", model_table, f" (model {tables['model']['kind']!r})"),
        routing=_build(RoutingConfig, "routing", tables["routing"], ""),
        optim=_build(OptimConfig, "optim", tables["optim"], ""),
        run=_build(RunConfig, "run", tables["run"], ""),
    )


def load_config(path: str | pathlib.Path) -> TrainConfig:
    """Read and validate a training config file (TOML); see the module docstring."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise MemcoreError(
            f"`config` must be an existing TOML file. Received: {str(p)!r} (not found)"
        )
    try:
        data = tomllib.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise MemcoreError(
            f"`config` must be a UTF-8 TOML file. Received: {str(p)!r} with byte "
            f"{exc.object[exc.start:exc.start + 1]!r} at offset {exc.start}"
        ) from None
    except OSError as exc:
        raise MemcoreError(
            f"`config` must be a readable TOML file. Received: {str(p)!r} ({exc.strerror or exc})"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise MemcoreError(f"`config` must be valid TOML. Received: {p}: {exc}") from None
    return parse_config(data)
