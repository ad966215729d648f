"""The compiled JAX training path for SAB models (``memcore train --backend jax``).

One jitted step does the routed gradient (:mod:`memcore.backends.jax.sab_model`, the same
drivers as the JAX backend's routing), global-norm clipping and Adam on parameter pytrees;
parameters and Adam's moments stay on the device and the host reads the loss and gradient
norm only when it logs, evaluates or checkpoints (the values of the steps in between are
kept on the device until then). The arithmetic is :mod:`memcore.train.optim`'s: Adam's
step sizes ``lr / (1 - b1^t)`` and ``sqrt(1 - b2^t)`` are computed on the host in float64,
as ``adam_update`` computes them, once per run, and indexed on the device by the step
count. Batches, checkpoints, resume and ``results.json`` are the trainer's.

Evaluation runs the SAB forward as one ``lax.scan`` (:func:`evaluate`): one compile per
(T, batch) shape, so a T = 5000 transfer evaluation is one program.

For benchmarks: ``params, opt = init_state(config)``; ``step = make_train_step(config)``;
``xs, targets, weights = device_batch(config, i)``;
``params, opt, loss, norm = step(params, opt, xs, targets, weights)``;
``evaluate(config, params, T=5000)``.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping
from typing import Any, NamedTuple, TextIO

import numpy as np

from memcore.errors import MemcoreError
from memcore.routing_types import HEAD_PARAM
from memcore.train.config import TrainConfig
from memcore.train.evaluate import score
from memcore.train.model import core_config, init_params, loss_kind
from memcore.train.optim import AdamState
from memcore.train.tasks import (
    STREAM_EVAL,
    STREAM_INIT,
    STREAM_TRAIN,
    batch_rng,
    make_batch,
    scored_steps,
    train_index,
)

__all__ = [
    "JaxAdam",
    "device_batch",
    "evaluate",
    "init_state",
    "default_unroll",
    "make_train_step",
    "outputs",
    "supports",
    "train_fast",
]


def supports(config: TrainConfig) -> bool:
    """The compiled path trains SAB models (every SAB routing); Memformer uses the generic one."""
    return config.model.kind == "sab"


class JaxAdam(NamedTuple):
    """Adam's state as a pytree: the step count t (int32 scalar) and the moments m, v."""

    step: Any
    m: Mapping[str, Any]
    v: Mapping[str, Any]


def _jax():
    import jax  # memcore imports no framework at module level

    return jax


def _device(device: str | None) -> Any:
    from memcore.registry import get_backend

    return get_backend("jax")._device(device)


def _put(x: np.ndarray, dtype: Any, device: str | None) -> Any:
    jax = _jax()
    return jax.device_put(np.asarray(x, dtype=dtype), _device(device))


def _float_dtype(dtype: str) -> Any:
    import jax.numpy as jnp

    return jnp.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)


def init_state(
    config: TrainConfig, dtype: str = "float32", device: str | None = None
) -> tuple[dict[str, Any], JaxAdam]:
    """The run's initial parameters (the trainer's seeded init) and a zero Adam state, on device."""
    params = init_params(config, batch_rng(config.run.seed, STREAM_INIT, 0))
    params = {k: _put(v, _float_dtype(dtype), device) for k, v in params.items()}
    return params, adam_zeros(params)


def adam_zeros(params: Mapping[str, Any]) -> JaxAdam:
    """t = 0 and zero moments shaped like ``params``."""
    jnp = _jax().numpy
    zeros = {k: jnp.zeros_like(p) for k, p in params.items()}
    return JaxAdam(jnp.zeros((), jnp.int32), zeros, dict(zeros))


def _targets(config: TrainConfig, targets: np.ndarray, dtype: str, device: str | None) -> Any:
    if loss_kind(config) == "xent":
        return _put(targets, np.int32, device)
    return _put(targets, _float_dtype(dtype), device)


def device_batch(
    config: TrainConfig, step: int, dtype: str = "float32", device: str | None = None
) -> tuple[Any, Any, Any]:
    """Training batch ``step`` (0-based, the trainer's seeded stream) as device arrays:
    (xs (T, B, I), targets, loss weights (T,))."""
    run = config.run
    rng = batch_rng(run.seed, STREAM_TRAIN, train_index(run, step))
    batch = make_batch(config.task, rng, run.batch_size)
    return (
        _put(batch.xs, _float_dtype(dtype), device),
        _targets(config, batch.targets, dtype, device),
        _put(np.asarray(batch.weights), _float_dtype(dtype), device),
    )


def _schedule(config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """lr / (1 - b1^t) and sqrt(1 - b2^t) for t = 1..steps, in float64 as adam_update has them."""
    o = config.optim
    t = np.arange(1, config.run.steps + 1, dtype=np.float64)
    return o.lr / (1.0 - o.beta1**t), np.sqrt(1.0 - o.beta2**t)


def default_unroll(device: str | None = None) -> int:
    """Scan steps per loop iteration: 1 on the CPU (fast compiles), 4 on accelerators."""
    jax = _jax()
    platform = jax.devices()[0].platform if device is None else _device(device).platform
    return 1 if platform == "cpu" else 4


def make_train_step(
    config: TrainConfig,
    dtype: str = "float32",
    donate: bool = False,
    unroll: int | None = None,
    mesh: Any = None,
):
    """The whole training step, jitted once per shape:
    ``step(params, opt, xs, targets, weights) -> (params, opt, loss, grad_norm)``.

    The gradient is the routing ``[routing] method`` names (bptt: full BPTT; sab_bptt and
    tbptt: sab_bptt; sparse_replay), then clip_grad_norm_'s rule and torch's Adam, exactly as
    :func:`memcore.train.optim.adam_update`. ``donate`` lets XLA update params and opt in
    place (their old buffers are then invalid; the CPU ignores donation). ``unroll``: the
    scans' steps per loop iteration (None: :func:`default_unroll`). Sparse replay tests each
    chunk for gradient only when the task has zero loss weights (else it replays them all).
    ``mesh``: data parallel (docs/distributed.md): xs and targets sharded along B over the
    mesh's axis "batch", params and Adam replicated, the gradient computed per device and
    averaged in one psum (:func:`memcore.train.distributed.shard_gradient`).
    """
    unroll = default_unroll() if unroll is None else unroll
    return _make_train_step(config, dtype, donate, unroll, mesh)


@functools.lru_cache(maxsize=16)
def _make_train_step(config: TrainConfig, dtype: str, donate: bool, unroll: int, mesh: Any):
    jax = _jax()
    jnp = jax.numpy
    from memcore.backends.jax import sab_model

    core, kind, o = core_config(config), loss_kind(config), config.optim
    driver = {"bptt": sab_model.sab_full_bptt, "sparse_replay": sab_model.sab_sparse_replay}.get(
        config.routing.method, sab_model.sab_bptt
    )
    options = {"unroll": unroll}
    if driver is sab_model.sab_sparse_replay:
        sample = make_batch(config.task, batch_rng(config.run.seed, STREAM_TRAIN, 0), 1)
        options["skip"] = any(w == 0.0 for w in sample.weights)
    sizes, roots = _schedule(config)
    b1, b2, eps, clip = o.beta1, o.beta2, o.eps, o.clip_norm
    hidden = config.model.hidden

    def gradient(params, xs, targets, weights):
        zeros = jnp.zeros((xs.shape[1], hidden), xs.dtype)
        loss, grads, _ = driver(
            sab_model.LSTM_NET, params, xs, (zeros, zeros), targets, weights, config=core,
            loss=kind, **options,
        )  # fmt: skip
        return loss, grads

    if mesh is not None:  # each device's rows, one psum of every gradient and the loss
        from memcore.train.distributed import shard_gradient

        gradient = shard_gradient(gradient, mesh)

    def step(params, opt, xs, targets, weights):
        dt = xs.dtype
        loss, grads = gradient(params, xs, targets, weights)
        norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree_util.tree_leaves(grads)))
        if clip > 0.0:
            coef = clip / (norm + 1e-6)
            coef = jnp.where(coef < 1.0, coef, jnp.ones_like(coef))
            grads = {k: g * coef for k, g in grads.items()}
        i = jnp.minimum(opt.step, len(sizes) - 1)
        step_size = jnp.asarray(sizes, dt)[i]
        root_c2 = jnp.asarray(roots, dt)[i]
        new_p, new_m, new_v = {}, {}, {}
        for k, p in params.items():
            g = grads[k]
            m = opt.m[k] * b1 + g * (1.0 - b1)
            v = opt.v[k] * b2 + (g * g) * (1.0 - b2)
            new_p[k] = p - (m / ((v**0.5) / root_c2 + eps)) * step_size
            new_m[k], new_v[k] = m, v
        return new_p, JaxAdam(opt.step + 1, new_m, new_v), loss, norm

    if mesh is None:
        return jax.jit(step, donate_argnums=(0, 1) if donate else ())
    from memcore.train.distributed import AXIS

    spec, named = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
    rep, rows = named(mesh, spec()), named(mesh, spec(None, AXIS))
    return jax.jit(
        step,
        in_shardings=(rep, rep, rows, rows, rep),
        out_shardings=rep,
        donate_argnums=(0, 1) if donate else (),
    )


# ----------------------------------------------------------------------------- evaluation
def outputs(config: TrainConfig, params: Mapping[str, Any], xs: Any, first: int = 0) -> Any:
    """Logits (T - first, B, C) (or y (T - first, B, O) without a head) of the SAB forward
    from h0 = c0 = 0, as one compiled ``lax.scan``; xs (T, B, I) on the device."""
    jnp = _jax().numpy
    from memcore.backends.jax import sab_model

    zeros = jnp.zeros((xs.shape[1], config.model.hidden), xs.dtype)
    ys, _ = sab_model.sab_outputs(
        sab_model.LSTM_NET, params, xs, (zeros, zeros), config=core_config(config), first=first,
        unroll=default_unroll(),
    )  # fmt: skip
    return ys @ params[HEAD_PARAM] if HEAD_PARAM in params else ys


def _metrics(config: TrainConfig, params: Mapping[str, Any], batch: Any, dtype: str, device):
    steps = batch.xs.shape[0]
    scored = scored_steps(config.task, steps)
    wanted = range(steps)[scored]
    xs = _put(batch.xs, _float_dtype(dtype), device)
    out = np.asarray(_jax().device_get(outputs(config, params, xs, first=wanted.start)))
    out = out[: len(wanted)]  # the scored steps run to the end in every task
    return score(config.task, out, batch.targets[scored])


def evaluate(
    config: TrainConfig,
    params: Mapping[str, Any],
    T: int | None = None,
    dtype: str = "float32",
    device: str | None = None,
) -> dict[str, float]:
    """:func:`memcore.train.evaluate.evaluate` with the compiled forward: run.eval_size
    held-out sequences (the eval stream) at length T, eval_batch at a time."""
    run = config.run
    sums: dict[str, float] = {}
    done, index = 0, 0
    while done < run.eval_size:
        size = min(run.eval_batch, run.eval_size - done)
        batch = make_batch(config.task, batch_rng(run.seed, STREAM_EVAL, index), size, T=T)
        for k, v in _metrics(config, params, batch, dtype, device).items():
            sums[k] = sums.get(k, 0.0) + v * size
        done, index = done + size, index + 1
    return {k: v / run.eval_size for k, v in sums.items()}


def _peak_bytes(config: TrainConfig, params, xs, targets, weights) -> int:
    """The routing's accounted bytes for this batch shape (traced, not run)."""
    from memcore.backends.jax import sab_routing

    return sab_routing.peak_bytes(
        config.routing.method, params, xs, targets, weights, core_config(config), loss_kind(config)
    )


# ----------------------------------------------------------------------------- the loop
def train_fast(
    setup: Any, config: TrainConfig, *, stop_after: int | None, progress: TextIO | None
) -> dict[str, Any]:
    """:func:`memcore.train.trainer.train` after its checks (``setup``), with the compiled
    step: same batches, history, checkpoints, interrupt handling and results."""
    from memcore.train import trainer as tr  # trainer imports this module lazily

    jax = _jax()
    run, dtype, device, ckpt = config.run, setup.dtype, setup.device, setup.ckpt
    if ckpt is not None:
        params = tr._to_backend(setup, ckpt.params)
        m, v = tr._to_backend(setup, ckpt.adam_m), tr._to_backend(setup, ckpt.adam_v)
        opt = JaxAdam(jax.numpy.asarray(ckpt.adam_step, jax.numpy.int32), m, v)
        start, history = ckpt.step, ckpt.history
    else:
        params = tr._to_backend(setup, init_params(config, batch_rng(run.seed, STREAM_INIT, 0)))
        opt, start, history = adam_zeros(params), 0, tr._new_history()
    end = run.steps if stop_after is None else min(run.steps, start + stop_after)
    on_cpu = jax.devices()[0].platform == "cpu" if device is None else device == "cpu"
    mesh = None if getattr(setup, "dp", None) is None else setup.dp.mesh  # --devices
    step_fn = make_train_step(
        config, dtype, donate=not on_cpu, unroll=default_unroll(device), mesh=mesh
    )
    bar = tr._Progress(run.steps, progress)
    pending: list[tuple[int, Any, Any]] = []  # (step, loss, norm) not yet read back

    def flush() -> None:
        """Read the kept losses and norms (one host sync) and check that they stayed finite."""
        values = jax.device_get([(loss, norm) for _, loss, norm in pending])
        for (done, _, _), (loss, norm) in zip(pending, values):
            if not math.isfinite(float(loss)):
                raise MemcoreError(
                    f"Training diverged: the loss must stay finite. Received: loss={float(loss)} "
                    f"at step {done}"
                )
            history["step"].append(done)
            history["loss"].append(float(loss))
            history["grad_norm"].append(float(norm))
        pending.clear()

    def save(last: tuple[Any, ...]) -> None:
        done, p, o = last[:3]
        tr._save(setup, config, p, AdamState(int(o.step), o.m, o.v), done, history)

    # (done, params, opt) of the last finished step, rebound in one assignment so that an
    # interrupt sees a consistent triple; `saved` is the step on disk.
    last, saved = (start, params, opt, None, None), (start if ckpt is not None else None)
    t0 = time.perf_counter()
    try:
        for step in range(start, end):
            rng = batch_rng(run.seed, STREAM_TRAIN, train_index(run, step))
            batch = make_batch(config.task, rng, run.batch_size)
            xs = _put(batch.xs, _float_dtype(dtype), device)
            targets = _targets(config, batch.targets, dtype, device)
            weights = _put(np.asarray(batch.weights), _float_dtype(dtype), device)
            done, params, opt = last[:3]
            done += 1
            events = tr.step_events(run, done, end)
            if events.logged:  # accuracy of the parameters that produced this loss, on this batch
                metrics = _metrics(config, params, batch, dtype, device)
                history["train"].append({"step": done, **metrics})
            if step == start:
                peak = _peak_bytes(config, params, xs, targets, weights)
                history["peak_cache_bytes"] = max(history["peak_cache_bytes"], peak)
            # One assignment: an interrupt sees the step either wholly done or not at all.
            last = (done, *step_fn(params, opt, xs, targets, weights))
            pending.append((done, *last[3:]))
            tr.report_compiled_step(
                history, bar, start, done, events, flush,
                functools.partial(evaluate, config, last[1], dtype=dtype, device=device),
            )  # fmt: skip
            if events.saves:
                history["train_time_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                save(last)
                saved = done
        bar.close()
        history["train_time_s"] += time.perf_counter() - t0
    except KeyboardInterrupt:
        if saved != last[0] and last[0] > 0:
            recorded = pending[-1][0] if pending else (history["step"] or [start])[-1]
            if recorded != last[0]:  # interrupted between the step and its bookkeeping
                pending.append((last[0], *last[3:]))
            flush()
            tr._trim_history(history, last[0])
            history["train_time_s"] += time.perf_counter() - t0
            save(last)
            saved = last[0]
        raise tr.TrainingInterrupted(saved or 0, setup.out, saved is not None) from None

    def fast_eval(backend, device_, dtype_, cfg, p, T=None):
        return evaluate(cfg, p, T=T, dtype=dtype_, device=device_)

    return tr._results(setup, config, last[1], history, end, end >= run.steps, fast_eval)
