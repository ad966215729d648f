"""The training loop: seeded batches, a routed gradient, clipped Adam, checkpoints, results.

Batch ``s`` comes from ``(seed, train stream, s)``, so a run resumed from the checkpoint
after step ``s`` sees exactly the batches an uninterrupted run sees; together with the
saved parameters and Adam state (exact copies in the run's dtype) the resumed loss curve
is the uninterrupted one. Everything that can make a run fail for its setup (backend,
device, dtype, routing, output folder, the checkpoint to resume) is checked before the
first step.

An interrupt (Ctrl-C, ``KeyboardInterrupt``) during training saves a checkpoint at the last
finished step and raises :class:`TrainingInterrupted`; ``resume=True`` continues from it.
A checkpoint records which backend ran which steps; resuming on another backend is refused
unless ``switch_backend=True``, and the switch is then recorded in the checkpoint and in
``results.json`` (``backends``: ``[first_step, name]`` pairs).
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TextIO

import attrs
import numpy as np

from memcore.errors import MemcoreError
from memcore.registry import get_backend
from memcore.train import distributed
from memcore.train.checkpoint import (
    Checkpoint,
    _check_same_run,  # noqa: F401 - fast_jax.py reaches it as trainer._check_same_run
    check_out_folder,
    check_resume,
    load_checkpoint,
    save_checkpoint,
)
from memcore.train.config import TrainConfig
from memcore.train.evaluate import batch_metrics, evaluate, plot_history
from memcore.train.model import init_params, loss_kind, routed_gradient, sab_state0
from memcore.train.optim import AdamState, adam_init, adam_update
from memcore.train.tasks import (
    STREAM_INIT,
    STREAM_TRAIN,
    baseline,
    batch_rng,
    make_batch,
    train_index,
)

__all__ = ["CHECKPOINT", "PLOT", "RESULTS", "TrainingInterrupted", "train"]

CHECKPOINT, RESULTS, PLOT = "checkpoint.npz", "results.json", "curves.png"
_DRIVER = {
    "bptt": "bptt",
    "mrbp": "mrbp",
    "sab_bptt": "sab_bptt",
    "tbptt": "sab_bptt",
    "sparse_replay": "sab_sparse_replay",
}


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by an interrupt; the checkpoint holds step ``steps_done``.

    Attributes:
        steps_done: optimizer steps in the checkpoint (0 with ``saved`` False: nothing to resume).
        out: the output folder holding ``checkpoint.npz``.
        saved: whether a checkpoint exists to ``--resume`` from.
    """

    def __init__(self, steps_done: int, out: pathlib.Path, saved: bool) -> None:
        super().__init__(f"training interrupted after step {steps_done}")
        self.steps_done, self.out, self.saved = steps_done, out, saved


@attrs.define
class _Setup:
    backend: Any
    device: str | None
    dtype: str
    out: pathlib.Path
    ckpt: Checkpoint | None = None
    backends: tuple[tuple[int, str], ...] = ()
    dp: Any = None  # distributed.DataParallel of a data-parallel run


def _prepare(
    config: TrainConfig,
    backend: str | None,
    device: str | None,
    out: str | None,
    resume: bool,
    switch_backend: bool = False,
    devices: str | int | None = None,
) -> _Setup:
    """Every check that can fail before training; returns the resolved setup."""
    # None follows the registry's precedence (MEMCORE_BACKEND, memcore.toml, numpy);
    # an unknown name is a MemcoreError listing the available ones.
    be = get_backend(backend)
    dp, device = distributed.setup(be.name, device, config, devices)  # torchrun ranks, a mesh
    names = tuple(be.devices())
    if device is not None and ("cuda:0" if device == "cuda" else device) not in names:
        raise MemcoreError(
            f"`--device` must be a device backend {be.name!r} has here. "
            f"Received: device={device!r} (available: {', '.join(names)})"
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
    setup = _Setup(be, device, config.run.dtype, path, backends=((0, be.name),), dp=dp)
    if resume:
        setup.ckpt = load_checkpoint(path / CHECKPOINT)
        setup.backends = check_resume(config, setup.ckpt, be.name, switch_backend)
    check_out_folder(path)
    return setup


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
    switch_backend: bool = False,
    fast: bool | None = None,
    devices: str | int | None = None,
) -> dict[str, Any]:
    """Train ``config``; write checkpoints, ``results.json`` and ``curves.png`` in the out folder.

    Args:
        config: the validated run.
        backend: registry name ("numpy", "torch", "jax", "cupy", ...); None = the registry's
            choice (``MEMCORE_BACKEND``, then ``memcore.toml``, then "numpy").
        device: e.g. "cpu", "cuda:0"; None = the backend's default.
        out: output folder (default ``run.out``).
        resume: continue from ``<out>/checkpoint.npz`` (its config must match, except
            steps/out; run.steps must not be below the steps it holds).
        stop_after: stop (with a checkpoint) after this many steps in this call, e.g. to fit
            a time-limited session; the run is then completed later with ``resume``.
        progress: where the progress bar goes (None = silent).
        switch_backend: with ``resume``, allow a backend other than the checkpoint's
            (recorded in ``results.json``'s ``backends``).
        fast: torch SAB runs only: the compiled step (:mod:`memcore.train.fast_torch`);
            None = on CUDA devices, False = never, True = also on the CPU. JAX SAB runs
            take :mod:`memcore.train.fast_jax` everywhere unless False.
        devices: jax only: "all" or N shards the global batch over a mesh of the local
            devices (docs/distributed.md); torch runs data-parallel under torchrun.

    Returns:
        The results dict (also written as JSON); "finished" says whether run.steps was reached.

    Raises:
        MemcoreError: a bad setup, found before the first step.
        TrainingInterrupted: an interrupt; the last finished step is checkpointed first.
    """
    setup = _prepare(config, backend, device, out, resume, switch_backend, devices)
    if setup.backend.name == "jax" and config.model.kind == "sab" and fast is not False:
        from memcore.train.fast_jax import train_fast

        return train_fast(setup, config, stop_after=stop_after, progress=progress)
    from memcore.train import fast_torch  # imports no framework itself

    if fast_torch.wanted(config, setup.backend.name, device, fast):  # one captured step
        return fast_torch.train_fast(setup, config, stop_after=stop_after, progress=progress)
    run, ckpt = config.run, setup.ckpt
    # (done, params, opt) of the last finished step, rebound in one assignment so an
    # interrupt anywhere sees a consistent triple; `saved` is the step on disk.
    start = ckpt.step if ckpt is not None else 0
    saved, last, history = (start if ckpt is not None else None), None, _new_history()
    t0 = time.perf_counter()
    try:
        with _threads(setup.backend, run.threads):
            last, history = _start(setup, config)
            end = run.steps if stop_after is None else min(run.steps, start + stop_after)
            bar = _Progress(run.steps, progress)
            for step in range(start, end):
                last = _step(setup, config, step, last, history, bar, start)
                done = last[0]
                if step_events(run, done, end).saves:
                    history["train_time_s"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    _save(setup, config, last[1], last[2], done, history)
                    saved = done
            bar.close()
            history["train_time_s"] += time.perf_counter() - t0
            return _results(setup, config, last[1], history, end, end >= run.steps)
    except KeyboardInterrupt:
        if last is not None and saved != last[0] and last[0] > 0:
            _trim_history(history, last[0])
            history["train_time_s"] += time.perf_counter() - t0
            _save(setup, config, last[1], last[2], last[0], history)
            saved = last[0]
        raise TrainingInterrupted(saved or 0, setup.out, saved is not None) from None


def _start(
    setup: _Setup, config: TrainConfig
) -> tuple[tuple[int, dict[str, Any], AdamState], dict[str, Any]]:
    """The state training starts from (the checkpoint's, or fresh) and the history so far."""
    ckpt = setup.ckpt
    if ckpt is None:
        rng = batch_rng(config.run.seed, STREAM_INIT, 0)
        params = _to_backend(setup, init_params(config, rng))
        return (0, params, adam_init(params)), _new_history()
    params = _to_backend(setup, ckpt.params)
    opt = AdamState(
        ckpt.adam_step, _to_backend(setup, ckpt.adam_m), _to_backend(setup, ckpt.adam_v)
    )
    return (ckpt.step, params, opt), ckpt.history


def _step(
    setup: _Setup,
    config: TrainConfig,
    step: int,
    last: tuple[int, dict[str, Any], AdamState],
    history: dict[str, Any],
    bar: _Progress,
    start: int,
) -> tuple[int, dict[str, Any], AdamState]:
    """One optimizer step from ``last``; appends to ``history``, returns the new triple."""
    run, be = config.run, setup.backend
    _, params, opt = last
    dim = getattr(config.model, "dim", 0)
    rng = batch_rng(run.seed, STREAM_TRAIN, train_index(run, step))
    batch = make_batch(config.task, rng, run.batch_size, dim=dim)
    local = distributed.local_batch(setup, batch)  # this rank's rows of the global batch
    xs = be.from_numpy(local.xs, dtype=setup.dtype, device=setup.device)
    state0 = None
    if config.model.kind == "sab":
        rows = int(local.xs.shape[1])
        state0 = sab_state0(be, rows, config.model.hidden, setup.dtype, setup.device)
    targets = _targets(setup, config, local.targets)
    res = routed_gradient(be, config, params, xs, targets, batch.weights, state0)
    res = distributed.reduce_result(setup, res)  # ranks: the mean, in one all-reduce
    if not math.isfinite(res.loss):
        raise MemcoreError(
            "Training diverged: the loss must stay finite. "
            f"Received: loss={res.loss} at step {step + 1}"
        )
    done = step + 1
    events = step_events(run, done, run.steps)
    if events.logged:  # accuracy of the parameters that produced this loss, on this batch
        metrics = batch_metrics(be, setup.device, setup.dtype, config, params, batch)
        history["train"].append({"step": done, **metrics})
    params, opt, norm = adam_update(params, res.grads, opt, config.optim)
    history["step"].append(done)
    history["loss"].append(res.loss)
    history["grad_norm"].append(norm)
    history["peak_cache_bytes"] = max(history["peak_cache_bytes"], int(res.peak_cache_bytes))
    if events.logged:
        bar.show(done, start, res.loss, _metric_text(history["train"][-1]), force=True)
    else:
        bar.show(done, start, res.loss, "", force=False)
    if events.evals:
        metrics = evaluate(be, setup.device, setup.dtype, config, params)
        history["eval"].append({"step": done, **metrics})
    return done, params, opt


class StepEvents(NamedTuple):
    """What follows step ``done``: a log line, an evaluation, a checkpoint."""

    logged: bool
    evals: bool
    saves: bool


def step_events(run: Any, done: int, end: int) -> StepEvents:
    """The one rule every training loop (generic and compiled) follows after step ``done``
    (1-based) of a run that stops at ``end``."""
    return StepEvents(
        logged=done % run.log_every == 0 or done == run.steps,
        evals=bool(run.eval_every and done % run.eval_every == 0 and done != run.steps),
        saves=bool(run.checkpoint_every and done % run.checkpoint_every == 0) or done == end,
    )


def report_compiled_step(
    history: dict[str, Any],
    bar: Any,
    start: int,
    done: int,
    events: StepEvents,
    flush: Callable[[], None],
    evaluate_now: Callable[[], dict[str, float]],
) -> None:
    """A compiled loop's bookkeeping after a step: read the device's pending losses when
    anything is reported (the only host sync), show the log line, evaluate."""
    if events.logged or events.evals or events.saves:
        flush()
    if events.logged:
        bar.show(done, start, history["loss"][-1], _metric_text(history["train"][-1]), force=True)
    if events.evals:
        history["eval"].append({"step": done, **evaluate_now()})


def _trim_history(history: dict[str, Any], done: int) -> None:
    """Drop what an interrupted step had appended after step ``done``."""
    for key in ("step", "loss", "grad_norm"):
        del history[key][done:]
    for key in ("train", "eval"):
        history[key] = [r for r in history[key] if r["step"] <= done]


def _save(
    setup: _Setup,
    config: TrainConfig,
    params: dict[str, Any],
    opt: AdamState,
    done: int,
    history: dict[str, Any],
) -> None:
    if not distributed.is_main(setup):  # rank 0 writes the checkpoint
        return
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
            backends=setup.backends,
        ),
    )


def _results(
    setup: _Setup,
    config: TrainConfig,
    params: dict[str, Any],
    history: dict[str, Any],
    done: int,
    finished: bool,
    evaluate: Any = evaluate,  # the compiled paths pass their own (same signature)
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
        "backends": [list(b) for b in setup.backends],
        "device": setup.device or "default",
        "replicas": 1 if setup.dp is None else setup.dp.world,  # data-parallel ranks or devices
        "steps_done": done,
        "finished": finished,
        "baseline": baseline(config.task),
        "final_eval": final,
        "transfer": transfer,
        "history": history,
    }
    if distributed.is_main(setup):
        (setup.out / RESULTS).write_text(json.dumps(results, indent=1))
        plot_history(setup.out / PLOT, config, history, final, done)
    return results
