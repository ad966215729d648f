"""The ``cupy`` backend: the reference's hand-written backward on CUDA, fused kernels on hot paths.

Importing this package imports cupy; ``memcore`` itself never does (the registry loads
this on first use of ``get_backend("cupy")``).
"""

from memcore.backends.cupy.backend import CupyBackend

__all__ = ["CupyBackend"]
