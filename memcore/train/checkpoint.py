"""Checkpoints: one ``.npz`` with parameters, Adam's state, the step, the config and the
history so far, written atomically (temporary file, then ``os.replace``).

Keys: ``param/<name>``, ``adam_m/<name>``, ``adam_v/<name>`` (NumPy copies of the backend
arrays, in the run's dtype), ``adam_step``, ``step`` (optimizer steps done), ``config``
(the config as JSON) and ``history`` (the curves as JSON, so a resumed run's results
cover the whole run).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import attrs
import numpy as np

from memcore.errors import MemcoreError

__all__ = ["Checkpoint", "load_checkpoint", "save_checkpoint"]


@attrs.frozen
class Checkpoint:
    """What a checkpoint holds, as NumPy arrays and plain Python values."""

    step: int
    params: dict[str, np.ndarray]
    adam_step: int
    adam_m: dict[str, np.ndarray]
    adam_v: dict[str, np.ndarray]
    config: dict[str, Any]
    history: dict[str, Any]


def save_checkpoint(path: str | pathlib.Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically."""
    path = pathlib.Path(path)
    arrays: dict[str, Any] = {}
    for prefix, group in (("param", ckpt.params), ("adam_m", ckpt.adam_m), ("adam_v", ckpt.adam_v)):
        for name, value in group.items():
            arrays[f"{prefix}/{name}"] = value
    arrays["step"] = np.asarray(ckpt.step)
    arrays["adam_step"] = np.asarray(ckpt.adam_step)
    arrays["config"] = np.asarray(json.dumps(ckpt.config, sort_keys=True))
    arrays["history"] = np.asarray(json.dumps(ckpt.history))
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_checkpoint(path: str | pathlib.Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        MemcoreError: the file is missing or is not a memcore checkpoint.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise MemcoreError(
            f"`--resume` needs a checkpoint at {str(path)!r}. Received: no such file "
            "(run without --resume first, or pass the --out folder of the earlier run)"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            groups: dict[str, dict[str, np.ndarray]] = {"param": {}, "adam_m": {}, "adam_v": {}}
            for key in data.files:
                prefix, _, name = key.partition("/")
                if name:
                    groups[prefix][name] = np.array(data[key])
            return Checkpoint(
                step=int(data["step"]),
                params=groups["param"],
                adam_step=int(data["adam_step"]),
                adam_m=groups["adam_m"],
                adam_v=groups["adam_v"],
                config=json.loads(str(data["config"])),
                history=json.loads(str(data["history"])),
            )
    except (KeyError, ValueError, OSError) as exc:
        raise MemcoreError(
            f"`--resume` checkpoint {str(path)!r} must be a memcore training checkpoint. "
            f"Received: unreadable ({exc})"
        ) from None
