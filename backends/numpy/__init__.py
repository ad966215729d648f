"""The ``numpy`` backend: the reference behind the protocol (hand-written backward)."""

from memcore.backends.numpy.backend import NumpyBackend

__all__ = ["NumpyBackend"]
