"""The compiled torch training path for SAB models (``memcore train --backend torch``).

:class:`TrainStep` is the whole training step (the routed gradient of
:mod:`memcore.backends.torch.sab_model`, global-norm clipping and Adam) as one function of
static device buffers: parameters, their ``.grad``, Adam's moments and step count, the batch.
Nothing in it reads the device from the host (the replay's chunk structure depends only on
T, k_trunc and k_att; top-k runs on the device; no ``float(loss)``), so on CUDA it is
captured once as a CUDA graph and replayed every step; on the CPU (and with ``graph=False``)
the same function runs eagerly. The arithmetic is :mod:`memcore.train.optim`'s: the step
sizes ``lr / (1 - b1^t)`` and ``sqrt(1 - b2^t)`` are computed on the host in float64 once
per run and indexed on the device by the step count, and m, v, p are updated with the same
operations in the same order as ``adam_update``.

:func:`train_fast` is the trainer's loop around it (same batches, history, checkpoints,
interrupt handling and results); the host reads the loss and gradient norm only when it
logs, evaluates or checkpoints. :func:`evaluate` runs the forward of
:mod:`memcore.backends.torch.sab_forward` (key bank, no gradient) for long T.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, TextIO

import numpy as np

from memcore.errors import MemcoreError
from memcore.routing_types import HEAD_PARAM, Loss
from memcore.train.config import TrainConfig
from memcore.train.evaluate import score
from memcore.train.model import core_config, init_params, loss_kind, release_points
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

__all__ = ["TrainStep", "evaluate", "supports", "train_fast", "wanted"]


def _torch():
    import torch  # memcore imports no framework at module level

    return torch


def supports(config: TrainConfig) -> bool:
    """The compiled path trains SAB models (every SAB routing); Memformer uses the generic one."""
    return config.model.kind == "sab"


def wanted(config: TrainConfig, backend: str, device: str | None, fast: bool | None) -> bool:
    """Whether ``memcore train`` takes this path: torch SAB runs on CUDA by default; on the
    CPU only when asked (``fast=True``); never with ``fast=False``."""
    if backend != "torch" or not supports(config) or fast is False:
        return False
    # Release-compatible settings (issue 14.4) train on this path only, on any device.
    return bool(fast) or (device or "").startswith("cuda") or bool(release_points(config))


class TrainStep:
    """One SAB training step on torch with every state on the device.

    Args:
        config: the run; params: name -> array (NumPy or tensor), the current parameters.
        opt: Adam's state (step count and moments, NumPy or tensors).
        dtype: "float32" or "float64"; device: e.g. "cpu", "cuda:0".
        graph: capture as a CUDA graph (default: on CUDA devices).
        dp: a torch ``distributed.DataParallel``: ``.grad`` become views of one flat
            buffer, all-reduced with the loss once per step (part of the graph).

    Attributes:
        params, m, v: name -> tensor (updated in place by :meth:`__call__`).
    """

    def __init__(
        self, config, params, opt: AdamState, *, dtype="float32", device=None, graph=None, dp=None
    ):
        torch = _torch()
        from memcore.backends.torch._common import torch_dtype

        self.config, self.core, self.kind = config, core_config(config), loss_kind(config)
        self.dev, self.dt = torch.device(device or "cpu"), torch_dtype(dtype)
        self.graph = self.dev.type == "cuda" if graph is None else graph

        def put(x):
            return torch.as_tensor(np.asarray(_np(x)), dtype=self.dt, device=self.dev).clone()

        self.params = {k: put(v).requires_grad_(True) for k, v in params.items()}
        for p in self.params.values():
            p.grad = torch.zeros_like(p)  # accumulated in place by every backward
        self.reducer = None
        if dp is not None:  # no DDP reducer: one explicit all-reduce, capturable in the graph
            from memcore.train.distributed import GradBuffer

            self.reducer = GradBuffer(self.params, dp.world)
        self.m = {k: put(v) for k, v in opt.m.items()}
        self.v = {k: put(v) for k, v in opt.v.items()}
        self.t = torch.tensor([int(opt.step)], dtype=torch.int64, device=self.dev)
        o = config.optim
        t = np.arange(1, config.run.steps + 1, dtype=np.float64)
        self.sizes = torch.tensor(o.lr / (1.0 - o.beta1**t), dtype=self.dt, device=self.dev)
        self.roots = torch.tensor(np.sqrt(1.0 - o.beta2**t), dtype=self.dt, device=self.dev)
        self.loss_out = torch.zeros((), dtype=torch.float64, device=self.dev)
        self.norm_out = torch.zeros((), dtype=torch.float64, device=self.dev)
        self.weights: tuple[float, ...] | None = None
        self._graph = None

    @property
    def step(self) -> int:
        """Adam's step count (reads the device)."""
        return int(self.t.item())

    def _buffers(self, batch) -> None:
        torch = _torch()
        self.weights = tuple(float(w) for w in batch.weights)
        self.w_dev = torch.tensor(self.weights, dtype=self.dt, device=self.dev)
        self.xs = torch.zeros(batch.xs.shape, dtype=self.dt, device=self.dev)
        tdt = torch.int64 if self.kind == "xent" else self.dt
        self.targets = torch.zeros(batch.targets.shape, dtype=tdt, device=self.dev)
        hidden = (batch.xs.shape[1], self.config.model.hidden)
        self.h0 = torch.zeros(hidden, dtype=self.dt, device=self.dev)
        self.c0 = torch.zeros(hidden, dtype=self.dt, device=self.dev)

    def body(self) -> None:
        """The step on the static buffers: gradient, clipping, Adam (no host sync)."""
        torch = _torch()
        from memcore.backends.torch import cells, sab_model

        P, method = self.params, self.config.routing.method
        torch._foreach_zero_([p.grad for p in P.values()])
        loss = Loss(self.kind, self.weights)
        kw = dict(config=self.core, loss=loss, weights_dev=self.w_dev)
        state0 = (self.h0, self.c0)
        if method == "sparse_replay":
            out = sab_model.replay_accumulate(
                cells.lstm, P, self.xs, state0, self.targets, skip=False, account=False,
                want_d_state0=False, **kw,
            )  # fmt: skip
            total = out.loss
        else:  # bptt: no cuts; sab_bptt and tbptt: the chunk cuts
            run = sab_model.sab_loss(
                cells.lstm, P, self.xs, state0, self.targets, truncate=method != "bptt",
                check=False, **kw,
            )  # fmt: skip
            run.loss.backward()
            total = run.loss.detach().to(torch.float64)
        if self.reducer is not None:  # ranks: mean gradients and loss, one all-reduce
            total = self.reducer.all_reduce(total)
        with torch.no_grad():
            self._update([p.grad for p in P.values()])
            self.loss_out.copy_(total)

    def _update(self, grads: list) -> None:
        """clip_by_global_norm then adam_update (memcore.train.optim), in place."""
        torch, o = _torch(), self.config.optim
        norm = torch.stack([(g * g).sum() for g in grads]).to(torch.float64).sum().sqrt()
        self.norm_out.copy_(norm)
        if o.clip_norm > 0.0:
            coef = o.clip_norm / (norm + 1e-6)
            coef = torch.where(coef < 1.0, coef, torch.ones_like(coef)).to(self.dt)
            torch._foreach_mul_(grads, coef)
        i = torch.clamp(self.t, max=len(self.sizes) - 1)
        step_size, root_c2 = self.sizes.index_select(0, i)[0], self.roots.index_select(0, i)[0]
        names = list(self.params)
        m, v, p = ([d[k] for k in names] for d in (self.m, self.v, self.params))
        b1, b2 = o.beta1, o.beta2
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, torch._foreach_mul(grads, 1.0 - b1))
        torch._foreach_mul_(v, b2)
        torch._foreach_add_(v, torch._foreach_mul(torch._foreach_mul(grads, grads), 1.0 - b2))
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, root_c2)
        torch._foreach_add_(denom, o.eps)
        upd = torch._foreach_div(m, denom)
        torch._foreach_mul_(upd, step_size)
        torch._foreach_sub_(p, upd)
        self.t.add_(1)

    def __call__(self, batch) -> tuple[Any, Any]:
        """One step on ``batch`` (a ``tasks.Batch``); returns the device scalars (loss, norm),
        overwritten by the next call."""
        torch = _torch()
        if self.weights is None:
            self._buffers(batch)
        elif tuple(float(w) for w in batch.weights) != self.weights:
            raise MemcoreError(
                "Batch loss weights must stay the same across steps in the compiled step. "
                "Received: weights that changed"
            )
        src_x = torch.from_numpy(np.ascontiguousarray(batch.xs)).to(self.dt)
        src_y = torch.from_numpy(np.ascontiguousarray(batch.targets)).to(self.targets.dtype)
        pin = self.dev.type == "cuda"
        self.xs.copy_(src_x.pin_memory() if pin else src_x, non_blocking=pin)
        self.targets.copy_(src_y.pin_memory() if pin else src_y, non_blocking=pin)
        if not self.graph:
            self.body()
        else:
            if self._graph is None:
                self._capture()
            self._graph.replay()
        return self.loss_out, self.norm_out

    def _capture(self) -> None:
        """Warm up on a side stream, restore the state the warm-up changed, capture once."""
        torch = _torch()
        state = [*self.params.values(), *self.m.values(), *self.v.values(), self.t]
        saved = [x.detach().clone() for x in state]
        side = torch.cuda.Stream(self.dev)
        side.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.body()
        torch.cuda.current_stream(self.dev).wait_stream(side)
        with torch.no_grad():
            for x, s in zip(state, saved):
                x.copy_(s)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self.body()

    def snapshot(self) -> tuple[dict[str, np.ndarray], AdamState]:
        """(params, AdamState) as NumPy (one host sync)."""
        def np_(d):
            return {k: x.detach().cpu().numpy() for k, x in d.items()}

        return np_(self.params), AdamState(self.step, np_(self.m), np_(self.v))


def _np(x: Any) -> Any:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x


# ----------------------------------------------------------------------------- evaluation
def outputs(config: TrainConfig, params: Mapping[str, Any], xs: Any, first: int = 0) -> Any:
    """Logits (T - first, B, C) (y without a head) of the SAB forward from h0 = c0 = 0."""
    from memcore.backends.torch import cells
    from memcore.backends.torch.sab_forward import sab_outputs

    torch = _torch()
    zeros = torch.zeros((xs.shape[1], config.model.hidden), dtype=xs.dtype, device=xs.device)
    P = {k: v.detach() for k, v in params.items()}
    ys = sab_outputs(cells.lstm, P, xs, (zeros, zeros), config=core_config(config), first=first)
    return ys @ P[HEAD_PARAM] if HEAD_PARAM in P else ys


def _metrics(config, params, batch, dtype, device) -> dict[str, float]:
    torch = _torch()
    from memcore.backends.torch._common import torch_dtype

    steps = batch.xs.shape[0]
    scored = scored_steps(config.task, steps)
    wanted_steps = range(steps)[scored]
    xs = torch.as_tensor(batch.xs, dtype=torch_dtype(dtype), device=device or "cpu")
    out = outputs(config, params, xs, first=wanted_steps.start)[: len(wanted_steps)]
    return score(config.task, out.cpu().numpy(), batch.targets[scored])


def evaluate(config, params, T=None, dtype="float32", device=None) -> dict[str, float]:
    """:func:`memcore.train.evaluate.evaluate` with the key-bank forward: run.eval_size
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


# ----------------------------------------------------------------------------- the loop
def train_fast(
    setup: Any, config: TrainConfig, *, stop_after: int | None, progress: TextIO | None
) -> dict[str, Any]:
    """:func:`memcore.train.trainer.train` after its checks (``setup``), with the compiled
    step: same batches, history, checkpoints, interrupt handling and results."""
    from memcore.train import trainer as tr  # trainer imports this module lazily
    from memcore.train.distributed import local_batch
    from memcore.train.model import routed_gradient, sab_state0

    run, dtype, device, ckpt = config.run, setup.dtype, setup.device, setup.ckpt
    if ckpt is not None:
        params, start, history = ckpt.params, ckpt.step, ckpt.history
        opt = AdamState(ckpt.adam_step, ckpt.adam_m, ckpt.adam_v)
    else:
        params = init_params(config, batch_rng(run.seed, STREAM_INIT, 0))
        zeros = {k: np.zeros_like(v) for k, v in params.items()}
        opt, start, history = AdamState(0, zeros, dict(zeros)), 0, tr._new_history()
    end = run.steps if stop_after is None else min(run.steps, start + stop_after)
    dp = getattr(setup, "dp", None)
    step_fn = TrainStep(config, params, opt, dtype=dtype, device=device, dp=dp)
    bar = tr._Progress(run.steps, progress)
    pending: list[tuple[int, Any, Any]] = []  # (step, loss, norm) not yet read back

    def flush() -> None:
        """Read the kept losses and norms (one host sync) and check that they stayed finite."""
        if not pending:
            return
        torch = _torch()
        values = torch.stack([x for _, l, n in pending for x in (l, n)]).cpu().tolist()
        for i, (done, _, _) in enumerate(pending):
            loss, norm = values[2 * i], values[2 * i + 1]
            if not math.isfinite(loss):
                raise MemcoreError(
                    f"Training diverged: the loss must stay finite. Received: loss={loss} "
                    f"at step {done}"
                )
            history["step"].append(done)
            history["loss"].append(loss)
            history["grad_norm"].append(norm)
        pending.clear()

    def save(done: int) -> None:
        p, o = step_fn.snapshot()
        tr._save(setup, config, p, o, done, history)

    view = {k: p.detach() for k, p in step_fn.params.items()}  # shares the updated storage
    last, saved = start, (start if ckpt is not None else None)
    t0 = time.perf_counter()
    try:
        with tr._threads(setup.backend, run.threads):
            for step in range(start, end):
                rng = batch_rng(run.seed, STREAM_TRAIN, train_index(run, step))
                batch = make_batch(config.task, rng, run.batch_size)
                local = local_batch(setup, batch)  # this rank's rows of the global batch
                done = step + 1
                events = tr.step_events(run, done, end)
                if events.logged:  # accuracy of the parameters that produced this loss, on this batch
                    metrics = _metrics(config, view, batch, dtype, device)
                    history["train"].append({"step": done, **metrics})
                if step == start and not release_points(config):  # the routing's accounted bytes,
                    # from the library driver once (release settings: not counted)
                    be = setup.backend
                    xs = be.from_numpy(local.xs, dtype=dtype, device=device)
                    tg = tr._targets(setup, config, local.targets)
                    s0 = sab_state0(be, xs.shape[1], config.model.hidden, dtype, device)
                    res = routed_gradient(be, config, view, xs, tg, batch.weights, s0)
                    peak = int(res.peak_cache_bytes)
                    history["peak_cache_bytes"] = max(history["peak_cache_bytes"], peak)
                loss, norm = step_fn(local)
                pending.append((done, loss.clone(), norm.clone()))
                last = done
                tr.report_compiled_step(
                    history, bar, start, done, events, flush,
                    lambda: evaluate(config, view, dtype=dtype, device=device),
                )  # fmt: skip
                if events.saves:
                    history["train_time_s"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    save(done)
                    saved = done
            bar.close()
            history["train_time_s"] += time.perf_counter() - t0
    except KeyboardInterrupt:
        if saved != last and last > 0 and step_fn.step == last:
            flush()
            tr._trim_history(history, last)
            history["train_time_s"] += time.perf_counter() - t0
            save(last)
            saved = last
        raise tr.TrainingInterrupted(saved or 0, setup.out, saved is not None) from None

    def fast_eval(backend, device_, dtype_, cfg, p, T=None):
        return evaluate(cfg, p, T=T, dtype=dtype_, device=device_)

    return tr._results(setup, config, view, history, end, end >= run.steps, fast_eval)
