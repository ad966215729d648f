"""Config records of the Memformer LM training: the segment-recall LM task and the model.

``[task] name = "lm_recall"`` with ``[model] kind = "memformer_lm"`` trains the library's
Memformer language model (:mod:`memcore.backends.torch.memformer`,
:mod:`memcore.backends.jax.memformer`) with the model-agnostic MRBP or BPTT. The records
are registered in :mod:`memcore.train.config`; the task and the gradients live in
:mod:`memcore.train.lm_task`.
"""

from __future__ import annotations

import attrs

from memcore.errors import MemcoreError
from memcore.models import MemformerConfig
from memcore.train._validators import int_min, one_of, real

__all__ = ["LMRecallTask", "MemformerLMModel", "lm_vocab"]


@attrs.frozen
class LMRecallTask:
    """Segment recall as language modelling: items shown in segment 0, asked for S later.

    The rollout has ``segments + 1`` segments of ``items`` tokens. Segment 0 shows one
    token per item, "item i has value v_i" (ids that encode both i and v_i); segments
    1..S-1 are distractors; segment S shows the query tokens "item i?" and must predict v_i
    at position i. Only segment S is scored (loss weights 0, ..., 0, 1), so the answer can
    reach it only through the memory, across S segment boundaries.

    Attributes:
        segments: S, the segments between the items and their recall (>= 1).
        items: L, items to remember = tokens per segment.
        values: V, the values an item can take (chance accuracy is 1 / V).
        distractors: "noise" (random value tokens) or "blank" (one blank token).
    """

    segments: int = attrs.field(validator=int_min(1))
    items: int = attrs.field(default=4, validator=int_min(1))
    values: int = attrs.field(default=8, validator=int_min(2))
    distractors: str = attrs.field(default="noise", validator=one_of("noise", "blank"))
    name: str = attrs.field(default="lm_recall", init=False)


def lm_vocab(task: LMRecallTask) -> int:
    """C = V values + L V item tokens + L query tokens + 1 blank."""
    return task.values * (1 + task.items) + task.items + 1


@attrs.frozen
class MemformerLMModel:
    """The library's Memformer LM (:class:`memcore.models.MemformerConfig`); the vocabulary
    comes from the task.

    Attributes:
        dim: D; heads: H (dividing D); layers: encoder layers; slots: K; tau: write
        temperature in (0, 1]; ffn_mult: FFN width over D.
    """

    dim: int = attrs.field(default=32, validator=int_min(1))
    heads: int = attrs.field(default=2, validator=int_min(1))
    layers: int = attrs.field(default=1, validator=int_min(1))
    slots: int = attrs.field(default=8, validator=int_min(1))
    tau: float = attrs.field(default=0.25, validator=real(0.0, 1.0, low_open=True))
    ffn_mult: int = attrs.field(default=4, validator=int_min(1))
    kind: str = attrs.field(default="memformer_lm", init=False)

    def __attrs_post_init__(self) -> None:
        if self.dim % self.heads:
            raise MemcoreError(
                f"`dim` must be divisible by `heads` ({self.heads}). Received: dim={self.dim}"
            )

    def model_config(self, vocab: int) -> MemformerConfig:
        """The library model's config for a task with ``vocab`` token ids."""
        return MemformerConfig(
            vocab=vocab,
            dim=self.dim,
            heads=self.heads,
            layers=self.layers,
            slots=self.slots,
            tau=self.tau,
            ffn_mult=self.ffn_mult,
        )
