"""TemplateBackend: the whole backend protocol in one class.

What each part is for (docs/porting.md has the full contract):

* ``devices``/``capabilities``: which devices exist and what each supports; the
  conformance suite skips, with the reason, every dtype ``capabilities`` leaves out.
* ``from_numpy``/``to_numpy``: the suite moves every value through these two.
* ``_forward``/``_vjp``: the ops of ``memcore.OPS``; :class:`memcore.protocol.BackendBase`
  validates each call first (shapes, dtypes, attributes, finiteness) and dispatches here.
* ``bptt``/``mrbp``/``sab_bptt``/``sab_sparse_replay``: the routing contract.
* ``from_dlpack`` (optional): lets :func:`memcore.protocol.transfer` skip the host copy.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np

from memcore import reference
from memcore.errors import MemcoreError
from memcore.protocol import BackendBase, Capabilities
from memcore.reference import routing
from memcore.routing_types import Loss, RoutingResult
from memcore_template.array import TArray, unwrap, wrap

__all__ = ["TemplateBackend"]

DEVICES = ("cpu",)
DEFAULT_LOSS = Loss()  # frozen, so one shared default is safe: mse, unit weights


def _wrap_result(result: RoutingResult) -> RoutingResult:
    """The reference's RoutingResult with every array as a TArray (loss stays a float)."""
    return attrs.evolve(
        result,
        grads=wrap(dict(result.grads)),
        d_state0=wrap(result.d_state0),
        final_state=wrap(result.final_state),
    )


class TemplateBackend(BackendBase):
    """The reference's numbers behind the TArray type, on one device ("cpu")."""

    name = "template"
    version = "0.1.0"
    # Known deviations ship with the backend: `memcore verify` and the pytest plugin read
    # this file unless --xfails is given (one check-id pattern per line, then `# reason`).
    xfail_file = pathlib.Path(__file__).with_name("xfails.txt")

    # ------------------------------------------------------------------ devices
    def devices(self) -> tuple[str, ...]:
        return DEVICES

    def _check_device(self, device: str | None) -> None:
        if device not in (None, *DEVICES):
            raise MemcoreError(
                f"`device` must be one of {DEVICES} for template. Received: device={device!r}"
            )

    def capabilities(self, device: str | None = None) -> Capabilities:
        self._check_device(device)
        return Capabilities(dtypes=("float32", "float64"), autodiff="hand-written", dlpack=True)

    # ------------------------------------------------------------------ arrays
    def from_numpy(
        self, x: np.ndarray, *, dtype: str | None = None, device: str | None = None
    ) -> TArray:
        self._check_device(device)
        return TArray(np.asarray(x, dtype=dtype))

    def to_numpy(self, x: Any) -> np.ndarray:
        if not isinstance(x, TArray):
            raise MemcoreError(f"`x` must be a TArray. Received: {type(x).__name__}")
        return x.numpy()

    def from_dlpack(self, obj: Any, *, device: str | None = None) -> TArray:
        self._check_device(device)
        return TArray(np.from_dlpack(obj))

    # ------------------------------------------------------------------ ops
    def _all_finite(self, x: Any) -> bool:
        return bool(np.all(np.isfinite(unwrap(x))))

    def _forward(self, op: str, inputs: tuple[Any, ...], attributes: dict[str, Any]) -> Any:
        return wrap(reference.forward(op, *unwrap(inputs), **unwrap(attributes))[0])

    def _vjp(self, op: str, inputs: tuple[Any, ...], attributes: dict[str, Any], cotangent: Any):
        out, cache = reference.forward(op, *unwrap(inputs), **unwrap(attributes))
        return wrap(out), wrap(reference.backward(op, cache, unwrap(cotangent)))

    # ------------------------------------------------------------------ routing
    def bptt(
        self,
        step: str,
        params: Mapping[str, Any],
        xs: Any,
        state0: Any,
        targets: Any,
        *,
        config: Any,
        loss: Loss = DEFAULT_LOSS,
        resets: Any = None,
        token_mask: Any = None,
        truncate_every: int | None = None,
    ) -> RoutingResult:
        """Full BPTT of ``step`` ("memformer" or "sab"); replace with your framework's."""
        p, x, s0, tg, rs, tm = unwrap((dict(params), xs, state0, targets, resets, token_mask))
        return _wrap_result(
            routing.bptt(
                step,
                p,
                x,
                s0,
                tg,
                config=config,
                loss=loss,
                resets=rs,
                token_mask=tm,
                truncate_every=truncate_every,
            )
        )

    def mrbp(
        self,
        params: Mapping[str, Any],
        xs: Any,
        M0: Any,
        targets: Any,
        *,
        config: Any,
        loss: Loss = DEFAULT_LOSS,
        resets: Any = None,
        token_mask: Any = None,
        truncate_every: int | None = None,
    ) -> RoutingResult:
        """Memformer MRBP: keep M_0..M_T, recompute each step backward (Memformer Alg. 1)."""
        p, x, m0, tg, rs, tm = unwrap((dict(params), xs, M0, targets, resets, token_mask))
        return _wrap_result(
            routing.mrbp(
                p,
                x,
                m0,
                tg,
                config=config,
                loss=loss,
                resets=rs,
                token_mask=tm,
                truncate_every=truncate_every,
            )
        )

    def sab_bptt(
        self,
        params: Mapping[str, Any],
        xs: Any,
        state0: Any,
        targets: Any,
        *,
        config: Any,
        loss: Loss = DEFAULT_LOSS,
    ) -> RoutingResult:
        """SAB on the whole graph, (h, c) cut at every chunk start."""
        p, x, s0, tg = unwrap((dict(params), xs, state0, targets))
        return _wrap_result(routing.sab_bptt(p, x, s0, tg, config=config, loss=loss))

    def sab_sparse_replay(
        self,
        params: Mapping[str, Any],
        xs: Any,
        state0: Any,
        targets: Any,
        *,
        config: Any,
        loss: Loss = DEFAULT_LOSS,
    ) -> RoutingResult:
        """SAB sparse replay: chunks replayed last to first, chunks without gradient skipped."""
        p, x, s0, tg = unwrap((dict(params), xs, state0, targets))
        return _wrap_result(routing.sab_sparse_replay(p, x, s0, tg, config=config, loss=loss))
