"""Checkpoints: one ``.npz`` with parameters, Adam's state, the step, the config and the
history so far, written atomically (temporary file in the same folder, flushed to disk,
then ``os.replace``), so a failing or interrupted write leaves the previous checkpoint
whole and no partial file behind.

Keys: ``param/<name>``, ``adam_m/<name>``, ``adam_v/<name>`` (NumPy copies of the backend
arrays, in the run's dtype), ``adam_step``, ``step`` (optimizer steps done), ``config``
(the config as JSON), ``history`` (the curves as JSON, so a resumed run's results cover
the whole run) and ``backends`` (JSON list of ``[first_step, backend_name]``: which backend
ran from which step; absent in checkpoints of memcore <= 0.1.0).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from typing import Any

import attrs
import numpy as np

from memcore.errors import MemcoreError
from memcore.train.config import TrainConfig, parse_config
from memcore.train.model import init_params

__all__ = [
    "Checkpoint",
    "check_out_folder",
    "check_resume",
    "load_checkpoint",
    "save_checkpoint",
]


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
    backends: tuple[tuple[int, str], ...] = ()


def check_out_folder(path: pathlib.Path) -> None:
    """Create ``path`` if needed and prove a file can be written there, before training.

    Raises:
        MemcoreError: ``path`` is a file, lies under a file, or cannot be written.
    """
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            what = "is a file" if parent == path else f"lies under the file {str(parent)!r}"
            raise MemcoreError(
                f"`--out` must be a folder memcore train can write. Received: {str(path)!r} {what}"
            )
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".memcore-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise MemcoreError(
            f"`--out` must be a folder memcore train can write. Received: {str(path)!r} "
            f"({exc.strerror or exc})"
        ) from None


def save_checkpoint(path: str | pathlib.Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically: the old file stays whole until the new one is."""
    path = pathlib.Path(path)
    arrays: dict[str, Any] = {}
    for prefix, group in (("param", ckpt.params), ("adam_m", ckpt.adam_m), ("adam_v", ckpt.adam_v)):
        for name, value in group.items():
            arrays[f"{prefix}/{name}"] = value
    arrays["step"] = np.asarray(ckpt.step)
    arrays["adam_step"] = np.asarray(ckpt.adam_step)
    arrays["config"] = np.asarray(json.dumps(ckpt.config, sort_keys=True))
    arrays["history"] = np.asarray(json.dumps(ckpt.history))
    arrays["backends"] = np.asarray(json.dumps([list(b) for b in ckpt.backends]))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # an interrupt or a full disk: drop the partial file, keep the old one
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str) -> None:
    """Remove ``path`` if it is there (cleanup after a failed write)."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def _bad(path: pathlib.Path, why: str) -> MemcoreError:
    return MemcoreError(
        f"`--resume` checkpoint {str(path)!r} must be a memcore training checkpoint. "
        f"Received: {why} (start again without --resume in a fresh --out folder)"
    )


def load_checkpoint(path: str | pathlib.Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        MemcoreError: the file is missing, empty, truncated or is not a memcore checkpoint.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise MemcoreError(
            f"`--resume` needs a checkpoint at {str(path)!r}. Received: no such file "
            "(run without --resume first, or pass the --out folder of the earlier run)"
        )
    if path.stat().st_size == 0:
        raise _bad(path, "an empty file")
    try:
        with np.load(path, allow_pickle=False) as data:
            groups: dict[str, dict[str, np.ndarray]] = {"param": {}, "adam_m": {}, "adam_v": {}}
            for key in data.files:
                prefix, _, name = key.partition("/")
                if name:
                    if prefix not in groups:
                        raise _bad(path, f"an unknown key {key!r}")
                    groups[prefix][name] = np.array(data[key])
            backends = ()
            if "backends" in data.files:
                backends = tuple((int(s), str(n)) for s, n in json.loads(str(data["backends"])))
            ckpt = Checkpoint(
                step=int(data["step"]),
                params=groups["param"],
                adam_step=int(data["adam_step"]),
                adam_m=groups["adam_m"],
                adam_v=groups["adam_v"],
                config=json.loads(str(data["config"])),
                history=json.loads(str(data["history"])),
                backends=backends,
            )
    except MemcoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip, npy and JSON errors all mean "not readable"
        raise _bad(path, f"unreadable ({type(exc).__name__}: {exc})") from None
    _check_contents(path, ckpt)
    return ckpt


def _check_contents(path: pathlib.Path, ckpt: Checkpoint) -> None:
    """The parts the trainer relies on have the right types (shapes are checked by it)."""
    if ckpt.step < 0 or ckpt.adam_step < 0:
        raise _bad(path, f"a negative step (step={ckpt.step}, adam_step={ckpt.adam_step})")
    if not isinstance(ckpt.config, dict) or not isinstance(ckpt.history, dict):
        raise _bad(path, "config or history that is not a JSON object")
    if set(ckpt.adam_m) != set(ckpt.params) or set(ckpt.adam_v) != set(ckpt.params):
        raise _bad(path, "Adam moments that do not match the parameters")
    steps = ckpt.history.get("step")
    if not isinstance(steps, list) or len(steps) != ckpt.step:
        raise _bad(path, f"a history that does not cover its {ckpt.step} steps")


def check_resume(
    config: TrainConfig, ckpt: Checkpoint, backend: str, switch: bool
) -> tuple[tuple[int, str], ...]:
    """Raise a MemcoreError unless ``ckpt`` continues this run: same config, matching
    arrays, steps not passed, same backend (or an explicit switch).

    Returns:
        The ``[first_step, backend]`` history to record from now on.
    """
    _check_same_run(config, ckpt.config)
    want = {k: v.shape for k, v in init_params(config, np.random.default_rng(0)).items()}
    for group, arrays in (("param", ckpt.params), ("adam_m", ckpt.adam_m), ("adam_v", ckpt.adam_v)):
        got = {k: v.shape for k, v in arrays.items()}
        if got != want:
            raise MemcoreError(
                f"`--resume` checkpoint arrays {group}/* must have the config's shapes {want}. "
                f"Received: {got}"
            )
    if ckpt.step > config.run.steps:
        raise MemcoreError(
            f"`run.steps` must be >= the {ckpt.step} steps the checkpoint already holds. "
            f"Received: steps={config.run.steps} (raise run.steps, or start a fresh --out)"
        )
    history = ckpt.backends or ((0, backend),)  # memcore <= 0.1.0 recorded none
    last = history[-1][1]
    if last == backend:
        return history
    if not switch:
        raise MemcoreError(
            f"`--backend` must be {last!r}, the backend the checkpoint was trained on. "
            f"Received: backend={backend!r} (pass --switch-backend to continue on it; "
            "the switch is recorded in results.json)"
        )
    return (*history, (ckpt.step, backend))


def _check_same_run(config: TrainConfig, saved: dict[str, Any]) -> None:
    """A resumed run must be the saved run: only run.steps and run.out may change."""
    now = config.to_dict()
    try:
        stored = parse_config(saved).to_dict()
    except MemcoreError as exc:
        raise MemcoreError(
            f"`--resume` checkpoint must hold a valid training config. Received: {exc}"
        ) from None
    for section in (now, stored):
        section["run"] = {k: v for k, v in section["run"].items() if k not in ("steps", "out")}
    if now != stored:
        diff = sorted(f"{s}.{k}" for s in now for k in now[s] if now[s].get(k) != stored[s].get(k))
        raise MemcoreError(
            "`--resume` config must match the checkpoint's (only run.steps and run.out may "
            f"change). Received: different {', '.join(diff)}"
        )
