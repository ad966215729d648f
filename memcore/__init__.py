"""memcore: the memory machinery of Memformer and Sparse Attentive Backtracking,
with a NumPy reference that defines the semantics and backends measured against it.

Importing memcore imports none of torch, jax or cupy; backends load on first use.
"""

from memcore.check_model import ModelCheck, check_mrbp
from memcore.config import MemoryConfig, SABConfig
from memcore.errors import MemcoreError
from memcore.ops import OPS, get_op
from memcore.options import Options, get_options, options
from memcore.registry import available_backends, get_backend, registered_backends, use_backend
from memcore.routing_types import Loss

__version__ = "0.1.0"
SPEC_VERSION = "1.0"

__all__ = [
    "Loss",
    "MemcoreError",
    "MemoryConfig",
    "ModelCheck",
    "OPS",
    "Options",
    "SABConfig",
    "SPEC_VERSION",
    "available_backends",
    "check_mrbp",
    "get_backend",
    "get_op",
    "get_options",
    "options",
    "registered_backends",
    "use_backend",
]
