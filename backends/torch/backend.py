"""The torch backend: every registered op in native torch ops, gradients from autograd.

Gradients come from ``torch.autograd.grad`` on the op's forward, never from the
reference's hand-written backward: comparing the two is an independent check of both.

``forward`` (and the ``backend.<op>(...)`` shortcuts) take part in autograd: when an input
requires grad and grad mode is on, the output has a ``grad_fn`` and ``.backward()`` gives
the op's gradient, so models built on the backend train. Without such inputs no graph is
kept. ``vjp`` runs on fresh leaves and never touches the caller's tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from memcore.backends.torch import attention, lstm, memory, sab
from memcore.backends.torch._common import DTYPES, HALF, torch_dtype
from memcore.errors import MemcoreError
from memcore.ops import get_op
from memcore.protocol import BackendBase, Capabilities, check_dtype_arg, check_to_numpy_arg
from memcore.routing_delegate import RoutingDelegate

__all__ = ["TorchBackend"]

OP_IMPL = {
    "memory_read": attention.memory_read,
    "slot_attention": attention.slot_attention,
    "bmn": memory.bmn,
    "memory_write": memory.memory_write,
    "memory_init": memory.memory_init,
    "memory_reset": memory.memory_reset,
    "lstm_cell": lstm.lstm_cell,
    "sab_scores": sab.sab_scores,
    "sparsify": sab.sparsify,
    "sparse_retrieve": sab.sparse_retrieve,
}


def _as_tensor(x: Any, device: torch.device | None) -> Any:
    """NumPy arrays (e.g. masks) become tensors on ``device``; tensors and None pass through."""
    if isinstance(x, np.ndarray):
        return torch.as_tensor(x, device=device)
    return x


class TorchBackend(RoutingDelegate, BackendBase):
    """torch tensors on the CPU or CUDA; float64, float32, bfloat16 and float16.

    Half types compute in float32 and return their own dtype.
    """

    name = "torch"
    array_frameworks = ("torch", "numpy")
    array_kind = "a torch.Tensor (or a NumPy array)"
    routing_module = "memcore.backends.torch.routing"
    version = torch.__version__

    # ------------------------------------------------------------------ devices, arrays
    def devices(self) -> tuple[str, ...]:
        cuda = (
            tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
            if torch.cuda.is_available()
            else ()
        )
        return ("cpu",) + cuda

    def _device(self, device: str | None) -> torch.device:
        if device is None:
            return torch.device("cpu")
        known = self.devices()
        name = "cuda:0" if device == "cuda" else device
        if name not in known:
            raise MemcoreError(
                f"`device` must be one of {known} for torch. Received: device={device!r}"
            )
        return torch.device(name)

    def capabilities(self, device: str | None = None) -> Capabilities:
        self._device(device)
        return Capabilities(dtypes=tuple(DTYPES), autodiff="native", dlpack=True)

    def from_numpy(
        self, x: np.ndarray, *, dtype: str | None = None, device: str | None = None
    ) -> Any:
        """A fresh tensor (never sharing memory with ``x``), cast to ``dtype`` on ``device``."""
        dev = self._device(device)
        if dtype is not None and not isinstance(dtype, str):
            dtype = check_dtype_arg(dtype)  # np.float32, np.dtype(...): their name
        arr = np.asarray(x)
        t = torch.tensor(arr, device=dev)  # copies
        if dtype is not None:
            t = t.to(torch_dtype(str(dtype)))
        return t

    def to_numpy(self, x: Any) -> np.ndarray:
        """A NumPy copy on the host; bfloat16 and float16 come back as float32."""
        if isinstance(x, np.ndarray):
            return np.array(x, copy=True)
        check_to_numpy_arg(self, x)
        t = x.detach()
        if t.dtype in HALF:
            t = t.to(torch.float32)
        return t.cpu().numpy().copy()

    def _all_finite(self, x: Any) -> bool:
        if isinstance(x, torch.Tensor):
            return bool(torch.isfinite(x).all())
        return bool(np.all(np.isfinite(np.asarray(x))))

    # ------------------------------------------------------------------ numerics
    def numerics_settings(self) -> dict[str, Any]:
        """Settings that change float results: TF32, reduced-precision reductions, determinism."""
        out: dict[str, Any] = {
            "torch_version": torch.__version__,
            "cuda_available": torch.cuda.is_available(),
            "cuda_version": torch.version.cuda,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "half_compute_dtype": "float32",
        }
        matmul = torch.backends.cuda.matmul
        # Each read in its own try: torch >= 2.9 raises when legacy and new TF32 flags mix.
        reads = {
            "cuda_matmul_allow_tf32": lambda: matmul.allow_tf32,
            "cudnn_allow_tf32": lambda: torch.backends.cudnn.allow_tf32,
            "cuda_matmul_fp32_precision": lambda: matmul.fp32_precision,
            "cudnn_conv_fp32_precision": lambda: torch.backends.cudnn.conv.fp32_precision,
            "fp16_reduced_precision_reduction": lambda: (
                matmul.allow_fp16_reduced_precision_reduction
            ),
            "bf16_reduced_precision_reduction": lambda: (
                matmul.allow_bf16_reduced_precision_reduction
            ),
        }
        for key, read in reads.items():
            try:
                out[key] = read()
            except (AttributeError, RuntimeError):
                out[key] = None
        return out

    def pin_numerics(self) -> dict[str, Any]:
        """Disable TF32 and reduced-precision reductions (for conformance); return the settings."""
        matmul = torch.backends.cuda.matmul
        if hasattr(matmul, "fp32_precision"):
            # torch >= 2.9: the new API only (mixing it with allow_tf32 is an error there).
            matmul.fp32_precision = "ieee"
            torch.backends.cudnn.conv.fp32_precision = "ieee"
            torch.backends.cudnn.rnn.fp32_precision = "ieee"
        else:  # pragma: no cover - older torch
            matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        matmul.allow_fp16_reduced_precision_reduction = False
        matmul.allow_bf16_reduced_precision_reduction = False
        return self.numerics_settings()

    # ------------------------------------------------------------------ ops
    def _forward(self, op: str, inputs: tuple[Any, ...], attributes: dict[str, Any]) -> Any:
        device = inputs[0].device if isinstance(inputs[0], torch.Tensor) else None
        ins = tuple(_as_tensor(x, device) for x in inputs)
        at = {k: _as_tensor(v, device) for k, v in attributes.items()}
        # No no_grad here: with inputs that require grad (and grad mode on) the output joins
        # the caller's graph; without them autograd records nothing, as for any torch op.
        return OP_IMPL[op](*ins, **at)

    def _vjp(self, op: str, inputs: tuple[Any, ...], attributes: dict[str, Any], cotangent: Any):
        spec = get_op(op)
        device = inputs[0].device if isinstance(inputs[0], torch.Tensor) else None
        # Fresh leaves: the caller's tensors are never touched, not even their .grad.
        leaves = tuple(
            _as_tensor(x, device).detach().requires_grad_(d)
            for x, d in zip(inputs, spec.differentiable)
        )
        at = {k: _as_tensor(v, device) for k, v in attributes.items()}
        with torch.enable_grad():
            out = OP_IMPL[op](*leaves, **at)
        outs = out if spec.multi_output else (out,)
        cts = tuple(cotangent) if spec.multi_output else (cotangent,)
        pairs = [(o, _as_tensor(c, device)) for o, c in zip(outs, cts) if o.requires_grad]
        wanted = [x for x, d in zip(leaves, spec.differentiable) if d]
        grads: tuple[Any, ...] = (None,) * len(wanted)
        if pairs and wanted:
            grads = torch.autograd.grad(
                [o for o, _ in pairs],
                wanted,
                grad_outputs=[c.to(o.dtype) for o, c in pairs],
                allow_unused=True,
            )
        it = iter(grads)
        result = []
        for x, d in zip(leaves, spec.differentiable):
            if not d:
                result.append(None)
                continue
            g = next(it)
            result.append(torch.zeros_like(x) if g is None else g.detach())
        detached = tuple(o.detach() for o in outs)
        return (detached if spec.multi_output else detached[0]), tuple(result)
