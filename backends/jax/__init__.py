"""The ``jax`` backend: memcore's ops in ``jax.numpy`` with gradients from ``jax.vjp``.

Importing this package imports JAX; ``import memcore`` alone never does.
"""

from memcore.backends.jax.backend import JaxBackend

__all__ = ["JaxBackend"]
