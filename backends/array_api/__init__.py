"""The ``array_api`` backend: the reference's hand-written forward and backward on any
namespace implementing the Python Array API standard.

``ArrayApiBackend(xp=namespace, device=...)`` wraps a namespace; the registered
``array_api`` backend (:func:`default_backend`) uses ``array_api_strict``, the strict
implementation that rejects anything outside the standard, so passing the suite on it
shows the reference needs nothing beyond the standard. Importing this package imports
no array library; :func:`default_backend` imports ``array_api_strict``.
"""

from memcore.backends.array_api.backend import ArrayApiBackend, default_backend, device_name

__all__ = ["ArrayApiBackend", "default_backend", "device_name"]
