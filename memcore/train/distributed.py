"""Data-parallel ``memcore train``: torch ranks under ``torchrun``, JAX over a device mesh.

One rule for both engines: ``run.batch_size`` B is the **global** batch. Step s draws its
batch from ``(seed, train stream, s)`` at size B, exactly as one process does, and replica r
of N trains on rows ``[r B/N, (r + 1) B/N)`` of it (B must be divisible by N). Every
training loss is a mean over the batch, so the mean of the N local gradients is the
global-batch gradient of one process; the loss is averaged the same way. Parameters and
Adam's state are the same on every replica, checkpoints hold them once, and ``--resume``
works on any N (the batches depend on the step, not on N).

* torch: ``torchrun --nproc-per-node N -m memcore train ...`` sets RANK / WORLD_SIZE /
  LOCAL_RANK; :func:`setup` joins (or creates) the process group, gloo on the CPU and NCCL
  on CUDA (rank r uses ``cuda:LOCAL_RANK``). Each step makes **one** all-reduce: every
  gradient and the loss in one flat buffer, summed and divided by N, after the routed
  gradient is complete. The compiled SAB step (:mod:`memcore.train.fast_torch`) keeps its
  ``.grad`` tensors as views of that buffer (:class:`GradBuffer`), so nothing is copied
  and the all-reduce is part of the captured CUDA graph; the replay's chunk backwards
  (MRBP's segment backwards) never communicate. Rank 0 alone writes checkpoints, results
  and plots.
* JAX: ``memcore train --backend jax --devices all`` (or N) builds a ``Mesh`` of the local
  devices with one axis ``"batch"``; the compiled SAB step takes the batch sharded along
  B and the parameters replicated, and runs the routed gradient under ``shard_map`` on each
  device's rows with one ``psum`` of all gradients and the loss (:func:`shard_gradient`),
  so the replay's scans and conditionals stay local and communicate nothing.

docs/distributed.md says what equals single-device training and what does not.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from memcore.errors import MemcoreError
from memcore.routing_types import RoutingResult

__all__ = [
    "AXIS",
    "DataParallel",
    "GradBuffer",
    "env_rank",
    "is_main",
    "jax_mesh",
    "local_batch",
    "reduce_result",
    "setup",
    "shard_gradient",
    "shutdown",
]

AXIS = "batch"
"""The JAX mesh axis the batch is sharded along."""

_OWNED: list[bool] = []  # whether setup() created the torch process group (shutdown ends it)


@attrs.frozen
class DataParallel:
    """The replicas of one data-parallel run.

    Attributes:
        kind: "torch" (one process per rank) or "jax" (one process, a device mesh).
        rank: this process's rank (0 for JAX).
        world: N, the number of replicas (ranks or devices).
        mesh: the JAX ``Mesh`` (axis :data:`AXIS`); None for torch.
    """

    kind: str
    rank: int
    world: int
    mesh: Any = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes checkpoints, results and plots (rank 0)."""
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of ``batch_size`` (torch); all rows (JAX)."""
        if self.kind == "jax":
            return slice(0, batch_size)
        per = batch_size // self.world
        return slice(self.rank * per, (self.rank + 1) * per)


def _dp(setup: Any) -> DataParallel | None:
    return getattr(setup, "dp", None)


def is_main(setup: Any) -> bool:
    """Whether the trainer's ``setup`` writes files: single-process runs and rank 0."""
    dp = _dp(setup)
    return dp is None or dp.is_main


def local_batch(setup: Any, batch: Any) -> Any:
    """This rank's slice of the global ``batch`` (a ``tasks.Batch``; xs and targets carry
    B on axis 1); the batch itself without ranks. (A JAX mesh splits the batch in the
    compiled step, which does not call this.)"""
    dp = _dp(setup)
    if dp is not None and dp.kind == "jax":  # only the compiled JAX step shards the batch
        raise MemcoreError(
            "`--devices` needs the compiled JAX SAB step (fast not False). Received: "
            "fast=False"
        )
    if dp is None:
        return batch
    rows = dp.rows(int(batch.xs.shape[1]))
    return type(batch)(batch.xs[:, rows], batch.targets[:, rows], batch.weights)


def _check_divides(batch_size: int, world: int, what: str) -> None:
    if batch_size % world:
        raise MemcoreError(
            f"`run.batch_size` must be divisible by the number of {what} ({world}): it is the "
            f"global batch, split evenly. Received: batch_size={batch_size}"
        )


# ----------------------------------------------------------------------------- setup
def setup(
    backend: str, device: str | None, config: Any, devices: str | int | None = None
) -> tuple[DataParallel | None, str | None]:
    """The run's replicas and this process's device, before any training step.

    torch: an initialized process group of more than one rank, or RANK / WORLD_SIZE > 1 in
    the environment (``torchrun``; the group is then created here: NCCL when ``device`` is
    CUDA, else gloo). A CUDA ``device`` becomes ``cuda:LOCAL_RANK``. JAX: ``devices``
    ("all" or a count N) asks for a mesh of the first N local devices.

    Args:
        backend: the backend's registry name; device: ``--device`` (None = default).
        config: the validated run (its global batch must split evenly).
        devices: ``--devices``: None (one device), "all" or an integer N >= 1.

    Raises:
        MemcoreError: ``--devices`` with a backend other than jax, with ``--device``, for a
            model the mesh path does not train, or more than there are; ranks of a backend
            other than torch; a batch that does not split evenly.
    """
    if devices is not None:
        return _jax_setup(backend, device, config, devices), device
    world = _torch_world()
    if world <= 1:
        return None, device
    if backend != "torch":
        raise MemcoreError(
            "Data-parallel ranks (torchrun, WORLD_SIZE > 1) need --backend torch (JAX: one "
            f"process with --devices all). Received: backend={backend!r}, world size {world}"
        )
    _check_divides(config.run.batch_size, world, "ranks")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None and device.startswith("cuda"):
        device = f"cuda:{local}"
    torch = _torch()
    dist = torch.distributed
    if not dist.is_initialized():
        cuda = device is not None and device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
        _OWNED.append(True)
    return DataParallel("torch", dist.get_rank(), dist.get_world_size()), device


def _torch() -> Any:
    import torch  # memcore imports no framework at module level

    return torch


def _torch_world() -> int:
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise MemcoreError(
            f"`WORLD_SIZE` must be an integer. Received: WORLD_SIZE={os.environ['WORLD_SIZE']!r}"
        ) from None


def env_rank() -> int:
    """RANK from the environment (torchrun), 0 without it."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def shutdown() -> None:
    """End the torch process group if :func:`setup` created it (``memcore train`` calls it)."""
    if _OWNED:
        _OWNED.clear()
        dist = _torch().distributed
        if dist.is_initialized():
            dist.destroy_process_group()


def _jax_setup(backend: str, device: str | None, config: Any, devices: str | int) -> DataParallel:
    if backend != "jax":
        raise MemcoreError(
            "`--devices` shards the batch over JAX devices; torch runs data-parallel under "
            f"torchrun --nproc-per-node N. Received: devices={devices!r}, backend={backend!r}"
        )
    if device is not None:
        raise MemcoreError(
            "`--device` and `--devices` exclude each other (the mesh holds the devices). "
            f"Received: device={device!r}, devices={devices!r}"
        )
    if config.model.kind != "sab":
        raise MemcoreError(
            "`--devices` trains SAB models (the compiled JAX step); other models train on "
            f"one device. Received: model.kind={config.model.kind!r}"
        )
    mesh = jax_mesh(devices)
    world = mesh.devices.size
    _check_divides(config.run.batch_size, world, "devices")
    return DataParallel("jax", 0, world, mesh)


# ----------------------------------------------------------------------------- torch
def _all_reduce_mean(flat: Any, world: int) -> None:
    """Sum ``flat`` over the ranks in place (one collective), then divide by N."""
    _torch().distributed.all_reduce(flat)
    flat.div_(world)


def reduce_result(setup: Any, res: RoutingResult) -> RoutingResult:
    """The generic trainer path (torch ranks): the mean over ranks of ``res``'s gradients
    and loss, in one all-reduce; ``res`` itself without ranks. Accounting stays per rank."""
    dp = _dp(setup)
    if dp is None or dp.kind != "torch":
        return res
    torch = _torch()
    names = list(res.grads)
    grads = [res.grads[k] for k in names]
    loss = torch.tensor([float(res.loss)], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss])
    _all_reduce_mean(flat, dp.world)
    out, at = {}, 0
    for k, g in zip(names, grads):
        out[k] = flat[at : at + g.numel()].view_as(g)
        at += g.numel()
    return attrs.evolve(res, loss=float(flat[-1]), grads=out)


class GradBuffer:
    """The compiled torch step's gradients as views of one flat buffer, all-reduced at once.

    Sets every parameter's ``.grad`` to a zero view into ``flat`` (P + 1,) (P parameter
    elements and one slot for the loss); autograd accumulates into those views in place,
    so :meth:`all_reduce` needs no copies and can be captured in a CUDA graph (NCCL).

    Args:
        params: name -> leaf tensor (all of one dtype and device).
        world: N, the ranks to average over.
    """

    def __init__(self, params: Mapping[str, Any], world: int) -> None:
        torch = _torch()
        tensors = list(params.values())
        dtypes = {(p.dtype, p.device) for p in tensors}
        if len(dtypes) != 1:
            raise MemcoreError(
                "`params` must share one dtype and device for the flat gradient buffer. "
                f"Received: {sorted(str(d) for d in dtypes)}"
            )
        total = sum(p.numel() for p in tensors)
        self.world = world
        self.flat = torch.zeros(total + 1, dtype=tensors[0].dtype, device=tensors[0].device)
        at = 0
        for p in tensors:
            p.grad = self.flat[at : at + p.numel()].view_as(p)
            at += p.numel()

    def all_reduce(self, loss: Any) -> Any:
        """Average every ``.grad`` and ``loss`` (0-d) over the ranks in one all-reduce;
        returns the mean loss as a 0-d float64 tensor."""
        torch = _torch()
        self.flat[-1].copy_(loss)
        _all_reduce_mean(self.flat, self.world)
        return self.flat[-1].to(torch.float64)


# ----------------------------------------------------------------------------- JAX
def jax_mesh(devices: str | int) -> Any:
    """A 1-d ``Mesh`` (axis :data:`AXIS`) of the first N local devices ("all": every one).

    Raises:
        MemcoreError: N not "all" nor an integer in 1..local device count.
    """
    import jax
    import numpy as np

    local = jax.local_devices()
    if devices == "all":
        n = len(local)
    else:
        try:
            n = int(devices)
        except (TypeError, ValueError):
            n = 0
        if not 1 <= n <= len(local):
            raise MemcoreError(
                f"`--devices` must be 'all' or an integer in 1..{len(local)} (the local "
                f"devices). Received: devices={devices!r}"
            )
    return jax.sharding.Mesh(np.array(local[:n]), (AXIS,))


def shard_gradient(fn: Callable[..., Any], mesh: Any) -> Callable[..., Any]:
    """``fn(params, xs, targets, weights) -> (loss, grads)`` on each device's rows, averaged.

    xs (T, B, ...) and targets (T, B, ...) are split along B over ``mesh``; params and
    weights (T,) are replicated. Every gradient and the loss go through **one** ``psum``
    (one flat vector, one all-reduce), then are divided by N, so the result is the
    global-batch mean of one device. Use inside ``jax.jit``.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    world = mesh.devices.size

    def local(params, xs, targets, weights):
        loss, grads = fn(params, xs, targets, weights)
        leaves, tree = jax.tree_util.tree_flatten(grads)
        dt = leaves[0].dtype
        parts = [x.reshape(-1).astype(dt) for x in leaves] + [loss.reshape(1).astype(dt)]
        flat = jax.lax.psum(jnp.concatenate(parts), AXIS) / world
        out, at = [], 0
        for x in leaves:
            out.append(flat[at : at + x.size].reshape(x.shape).astype(x.dtype))
            at += x.size
        return flat[-1].astype(loss.dtype), jax.tree_util.tree_unflatten(tree, out)

    batch = P(None, AXIS)
    # check_vma=False: the drivers' scans start from zeros made inside (replicated) and carry
    # per-device values; the psum makes the outputs replicated, as out_specs say.
    return jax.shard_map(
        local, mesh=mesh, in_specs=(P(), batch, batch, P()), out_specs=(P(), P()),
        check_vma=False,
    )  # fmt: skip
