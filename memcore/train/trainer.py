"""The training loop: seeded batches, a routed gradient, clipped Adam, checkpoints, results.

Batch ``s`` comes from ``(seed, train stream, s)``, so a run resumed from the checkpoint
after step ``s`` sees exactly the batches an uninterrupted run sees; together with the
saved parameters and Adam state (exact copies in the run's dtype) the resumed loss curve
is the uninterrupted one. Everything that can make a run fail for its setup (backend,
device, dtype, routing, output folder) is checked before the first step.
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import attrs
import numpy as np

from memcore.errors import MemcoreError
from memcore.registry import get_backend
from memcore.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from memcore.train.config import TrainConfig, parse_config
from memcore.train.evaluate import batch_metrics, evaluate, plot_history
from memcore.train.model import init_params, loss_kind, routed_gradient, sab_state0
from memcore.train.optim import AdamState, adam_init, adam_update
from memcore.train.tasks import (
    STREAM_INIT,
    STREAM_TRAIN,
    baseline,
    batch_rng,
    make_batch,
)

__all__ = ["CHECKPOINT", "PLOT", "RESULTS", "train"]

CHECKPOINT, RESULTS, PLOT = "checkpoint.npz", "results.json", "curves.png"
_DRIVER = {
    "bptt": "bptt",
    "mrbp": "mrbp",
    "sab_bptt": "sab_bptt",
    "tbptt": "sab_bptt",
    "sparse_replay": "sab_sparse_replay",
}


@attrs.define
class _Setup:
    backend: Any
    device: str | None
    dtype: str
    out: pathlib.Path


def _prepare(
    config: TrainConfig, backend: str | None, device: str | None, out: str | None, resume: bool
) -> _Setup:
    """Every check that can fail before training; returns the resolved setup."""
    be = get_backend(backend or "numpy")  # unknown name -> MemcoreError listing the available ones
    names = tuple(be.devices())
    if device is not None and ("cuda:0" if device == "cuda" else device) not in names:
        raise MemcoreError(
            f"`--device` must be a device backend {be.name!r} has here. Received: device={device!r} "
            f"(available: {', '.join(names)})"
        )
    caps = be.capabilities(device)
    if config.run.dtype not in caps.dtypes:
        raise MemcoreError(
            f"`run.dtype` must be one of {', '.join(caps.dtypes)} on backend {be.name!r} "
            f"device {device or 'default'!r}. Received: dtype={config.run.dtype!r}"
        )
    driver = _DRIVER[config.routing.method]
    if not callable(getattr(be, driver, None)):
        raise MemcoreError(
            f"Backend {be.name!r} must provide the routing driver {driver!r} for routing "
            f"{config.routing.method!r}. Received: a backend without it"
        )
    path = pathlib.Path(out or config.run.out)
    if (path / CHECKPOINT).exists() and not resume:
        raise MemcoreError(
            f"`--out` {str(path)!r} already holds a checkpoint. Received: no --resume "
            "(pass --resume to continue that run, or choose another --out)"
        )
    path.mkdir(parents=True, exist_ok=True)
    return _Setup(be, device, config.run.dtype, path)


@contextlib.contextmanager
def _threads(backend: Any, threads: int) -> Iterator[None]:
    """torch only: use ``threads`` CPU threads inside the block, then restore the setting."""
    torch = sys.modules.get("torch") if backend.name == "torch" else None
    if not threads or torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Progress:
    """A one-line progress bar on a terminal, else one line every ``log_every`` steps."""

    def __init__(self, total: int, stream: TextIO | None) -> None:
        self.total, self.stream, self.t0 = total, stream, time.perf_counter()
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())

    def show(self, step: int, start: int, loss: float, metric: str, force: bool) -> None:
        if self.stream is None or not (self.tty or force):
            return
        rate = (step - start) / max(time.perf_counter() - self.t0, 1e-9)
        filled = int(30 * step / self.total)
        line = (
            f"step {step}/{self.total} |{'#' * filled}{'.' * (30 - filled)}| "
            f"loss {loss:.4f} {metric} {rate:.2f} it/s"
        )
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None and self.tty:
            self.stream.write("\n")


def _metric_text(metrics: dict[str, float]) -> str:
    if "accuracy" in metrics:
        return f"acc {metrics['accuracy']:.1%}"
    return f"mse {metrics['mse']:.4f}"


def _to_backend(setup: _Setup, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    return {
        k: setup.backend.from_numpy(v, dtype=setup.dtype, device=setup.device)
        for k, v in arrays.items()
    }


def _targets(setup: _Setup, config: TrainConfig, targets: np.ndarray) -> Any:
    if loss_kind(config) == "xent":
        return setup.backend.from_numpy(targets.astype(np.int32), device=setup.device)
    return setup.backend.from_numpy(targets, dtype=setup.dtype, device=setup.device)


def _new_history() -> dict[str, Any]:
    return {
        "step": [],
        "loss": [],
        "grad_norm": [],
        "train": [],
        "eval": [],
        "train_time_s": 0.0,
        "peak_cache_bytes": 0,
    }


def train(
    config: TrainConfig,
    *,
    backend: str | None = None,
    device: str | None = None,
    out: str | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    """Train ``config``; write checkpoints, ``results.json`` and ``curves.png`` under the out folder.

    Args:
        config: the validated run.
        backend: registry name ("numpy", "torch", "jax", "cupy", ...); None = "numpy".
        device: e.g. "cpu", "cuda:0"; None = the backend's default.
        out: output folder (default ``run.out``).
        resume: continue from ``<out>/checkpoint.npz`` (its config must match, except steps/out).
        stop_after: stop (with a checkpoint) after this many steps in this call, e.g. to fit
            a time-limited session; the run is then completed later with ``resume``.
        progress: where the progress bar goes (None = silent).

    Returns:
        The results dict (also written as JSON); "finished" says whether run.steps was reached.
    """
    setup = _prepare(config, backend, device, out, resume)
    run, be = config.run, setup.backend
    if resume:
        ckpt = load_checkpoint(setup.out / CHECKPOINT)
        _check_same_run(config, ckpt.config)
        params = _to_backend(setup, ckpt.params)
        opt = AdamState(
            ckpt.adam_step, _to_backend(setup, ckpt.adam_m), _to_backend(setup, ckpt.adam_v)
        )
        start, history = ckpt.step, ckpt.history
    else:
        params = _to_backend(setup, init_params(config, batch_rng(run.seed, STREAM_INIT, 0)))
        opt, start, history = adam_init(params), 0, _new_history()
    end = run.steps if stop_after is None else min(run.steps, start + stop_after)
    bar = _Progress(run.steps, progress)
    dim = getattr(config.model, "dim", 0)
    with _threads(be, run.threads):
        t0 = time.perf_counter()
        for step in range(start, end):
            batch = make_batch(
                config.task, batch_rng(run.seed, STREAM_TRAIN, step), run.batch_size, dim=dim
            )
            xs = be.from_numpy(batch.xs, dtype=setup.dtype, device=setup.device)
            state0 = None
            if config.model.kind == "sab":
                state0 = sab_state0(
                    be, run.batch_size, config.model.hidden, setup.dtype, setup.device
                )
            res = routed_gradient(
                be,
                config,
                params,
                xs,
                _targets(setup, config, batch.targets),
                batch.weights,
                state0,
            )
            if not math.isfinite(res.loss):
                raise MemcoreError(
                    f"Training diverged: the loss must stay finite. Received: loss={res.loss} at step {step + 1}"
                )
            done = step + 1
            logged = done % run.log_every == 0 or done == run.steps
            if logged:  # accuracy of the parameters that produced this loss, on this batch
                metrics = batch_metrics(
                    setup.backend, setup.device, setup.dtype, config, params, batch
                )
                history["train"].append({"step": done, **metrics})
            params, opt, norm = adam_update(params, res.grads, opt, config.optim)
            history["step"].append(done)
            history["loss"].append(res.loss)
            history["grad_norm"].append(norm)
            history["peak_cache_bytes"] = max(
                history["peak_cache_bytes"], int(res.peak_cache_bytes)
            )
            if logged:
                bar.show(done, start, res.loss, _metric_text(history["train"][-1]), force=True)
            else:
                bar.show(done, start, res.loss, "", force=False)
            if run.eval_every and done % run.eval_every == 0 and done != run.steps:
                history["eval"].append(
                    {
                        "step": done,
                        **evaluate(setup.backend, setup.device, setup.dtype, config, params),
                    }
                )
            if (run.checkpoint_every and done % run.checkpoint_every == 0) or done == end:
                history["train_time_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                _save(setup, config, params, opt, done, history)
        bar.close()
        history["train_time_s"] += time.perf_counter() - t0
        finished = end >= run.steps
        results = _results(setup, config, params, history, end, finished)
    return results


def _save(
    setup: _Setup,
    config: TrainConfig,
    params: dict[str, Any],
    opt: AdamState,
    done: int,
    history: dict[str, Any],
) -> None:
    np_ = setup.backend.to_numpy
    save_checkpoint(
        setup.out / CHECKPOINT,
        Checkpoint(
            step=done,
            params={k: np_(v) for k, v in params.items()},
            adam_step=opt.step,
            adam_m={k: np_(v) for k, v in opt.m.items()},
            adam_v={k: np_(v) for k, v in opt.v.items()},
            config=config.to_dict(),
            history=history,
        ),
    )


def _check_same_run(config: TrainConfig, saved: dict[str, Any]) -> None:
    """A resumed run must be the saved run: only run.steps and run.out may change."""
    now = config.to_dict()
    stored = parse_config(saved).to_dict()
    for section in (now, stored):
        section["run"] = {k: v for k, v in section["run"].items() if k not in ("steps", "out")}
    if now != stored:
        diff = sorted(f"{s}.{k}" for s in now for k in now[s] if now[s].get(k) != stored[s].get(k))
        raise MemcoreError(
            f"`--resume` config must match the checkpoint's (only run.steps and run.out may change). "
            f"Received: different {', '.join(diff)}"
        )


def _results(
    setup: _Setup,
    config: TrainConfig,
    params: dict[str, Any],
    history: dict[str, Any],
    done: int,
    finished: bool,
) -> dict[str, Any]:
    final = evaluate(setup.backend, setup.device, setup.dtype, config, params)
    transfer = {}
    if finished and config.task.name == "copy":
        transfer = {
            str(T): evaluate(setup.backend, setup.device, setup.dtype, config, params, T=T)
            for T in config.task.transfer_T
        }
    results = {
        "config": config.to_dict(),
        "backend": setup.backend.name,
        "backend_version": setup.backend.version,
        "device": setup.device or "default",
        "steps_done": done,
        "finished": finished,
        "baseline": baseline(config.task),
        "final_eval": final,
        "transfer": transfer,
        "history": history,
    }
    (setup.out / RESULTS).write_text(json.dumps(results, indent=1))
    plot_history(setup.out / PLOT, config, history, final, done)
    return results
