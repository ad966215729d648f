"""The NumPy reference: exact semantics of every memcore op, with hand-written backward passes.

For each op ``name`` of :data:`memcore.ops.OPS`:

* ``name(*inputs, **attrs) -> out``
* ``name_forward(*inputs, **attrs) -> (out, cache)``
* ``name_backward(cache, grad_out) -> grads``: one per input, in declared order.

Inputs are validated at this public entry (``MemcoreError`` naming the argument) and
never mutated. The code is written against an array namespace, so CuPy arrays work too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from memcore.errors import MemcoreError
from memcore.ops import OPS
from memcore.options import get_options
from memcore.reference import attention, lstm, memory, sab
from memcore.reference._xp import all_finite

_IMPL: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "memory_read": (attention.memory_read_forward, attention.memory_read_backward),
    "slot_attention": (attention.slot_attention_forward, attention.slot_attention_backward),
    "bmn": (memory.bmn_forward, memory.bmn_backward),
    "memory_write": (memory.memory_write_forward, memory.memory_write_backward),
    "memory_init": (memory.memory_init_forward, memory.memory_init_backward),
    "memory_reset": (memory.memory_reset_forward, memory.memory_reset_backward),
    "lstm_cell": (lstm.lstm_cell_forward, lstm.lstm_cell_backward),
    "sab_scores": (sab.sab_scores_forward, sab.sab_scores_backward),
    "sparsify": (sab.sparsify_forward, sab.sparsify_backward),
    "sparse_retrieve": (sab.sparse_retrieve_forward, sab.sparse_retrieve_backward),
}
assert set(_IMPL) == set(OPS), "every registered op needs a reference pair"


def _public(name: str) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    spec = OPS[name]
    fwd, bwd = _IMPL[name]

    @functools.wraps(fwd)
    def forward(*inputs: Any, **attributes: Any) -> tuple[Any, Any]:
        finite = all_finite if get_options().check_finite else None
        _, filled = spec.validate(inputs, attributes, all_finite=finite)
        return fwd(*inputs, **filled)

    @functools.wraps(bwd)
    def backward(cache: Any, grad_out: Any) -> tuple[Any, ...]:
        if spec.multi_output and (not isinstance(grad_out, (tuple, list)) or len(grad_out) != len(spec.outputs)):
            names = ", ".join(n for n, _ in spec.outputs)
            raise MemcoreError(
                f"`grad_out` of {name} must be a tuple of {len(spec.outputs)} arrays ({names}). "
                f"Received: {type(grad_out).__name__}"
            )
        return tuple(bwd(cache, tuple(grad_out) if spec.multi_output else grad_out))

    def op(*inputs: Any, **attributes: Any) -> Any:
        return forward(*inputs, **attributes)[0]

    op.__name__ = op.__qualname__ = name
    forward.__name__ = forward.__qualname__ = f"{name}_forward"
    backward.__name__ = backward.__qualname__ = f"{name}_backward"
    op.__doc__ = fwd.__doc__
    return op, forward, backward


__all__: list[str] = []
for _name in OPS:
    _op, _fwd, _bwd = _public(_name)
    globals()[_name] = _op
    globals()[f"{_name}_forward"] = _fwd
    globals()[f"{_name}_backward"] = _bwd
    __all__ += [_name, f"{_name}_forward", f"{_name}_backward"]  # noqa: PLE0604 - names from OPS
del _name, _op, _fwd, _bwd


def forward(name: str, *inputs: Any, **attributes: Any) -> tuple[Any, Any]:
    """``name_forward`` looked up by op name."""
    return globals()[f"{OPS[name].name}_forward"](*inputs, **attributes)


def backward(name: str, cache: Any, grad_out: Any) -> tuple[Any, ...]:
    """``name_backward`` looked up by op name."""
    return globals()[f"{OPS[name].name}_backward"](cache, grad_out)


__all__ += ["forward", "backward"]
