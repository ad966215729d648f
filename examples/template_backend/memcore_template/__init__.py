"""A template memcore backend: copy this package to port memcore to a new array library.

It wraps the NumPy reference with its own array type, :class:`TArray`, so it exercises
everything a real port does (conversion, devices, capabilities, DLPack, routing) while the
numbers stay the reference's. Replace the bodies of ``_forward``, ``_vjp`` and the routing
methods with calls into your framework; keep the signatures. See memcore's docs/porting.md.
"""

from memcore_template.array import TArray
from memcore_template.backend import TemplateBackend

__all__ = ["TArray", "TemplateBackend"]
