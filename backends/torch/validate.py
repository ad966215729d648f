"""Entry checks of the torch routing drivers: :mod:`memcore.routing_validation` with torch's
array rules (arrays must be ``torch.Tensor``; finiteness and id ranges are tested on the
tensors' own device, so CUDA tensors never leave it).

Every failure is a ``MemcoreError`` naming the argument, the expected and the received value,
with the same wording as the reference and JAX drivers.
"""

from __future__ import annotations

import functools

import torch

from memcore import routing_validation
from memcore.routing_validation import ArrayRules

__all__ = ["TORCH_ARRAYS", "check_memformer", "check_sab"]

TORCH_ARRAYS = ArrayRules(
    kind="a torch.Tensor",
    types=(torch.Tensor,),
    all_finite=lambda x: bool(torch.isfinite(x).all()),
    all_true=lambda mask: bool(mask.all()),
)

check_memformer = functools.partial(routing_validation.check_memformer, rules=TORCH_ARRAYS)
check_sab = functools.partial(routing_validation.check_sab, rules=TORCH_ARRAYS)
