"""The ``torch`` backend: every memcore op in native torch, gradients from autograd.

Also the routing drivers (``bptt``, ``mrbp``, ``sab_bptt``, ``sab_sparse_replay``) and
drop-in ``nn.Module``s (:class:`MemoryReader`, :class:`MemoryWriter`, :class:`SABCell`)
with :func:`train_mrbp`. Importing this module imports torch; ``import memcore`` does not.
"""

from memcore.backends.torch.backend import TorchBackend
from memcore.backends.torch.modules import (
    MemoryReader,
    MemoryWriter,
    MRBPResult,
    SABCell,
    SABState,
    memformer_params,
    train_mrbp,
)

__all__ = [
    "MRBPResult",
    "MemoryReader",
    "MemoryWriter",
    "SABCell",
    "SABState",
    "TorchBackend",
    "memformer_params",
    "train_mrbp",
]
