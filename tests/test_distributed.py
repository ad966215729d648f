"""Data-parallel ``memcore train`` (memcore.train.distributed): 2 gloo ranks and a 2-device
JAX mesh train exactly as one process on the global batch, with one all-reduce per step."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from memcore.errors import MemcoreError
from memcore.train import parse_config, train
from memcore.train.checkpoint import load_checkpoint

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None
ROOT = pathlib.Path(__file__).resolve().parent.parent

SAB = {
    "task": {"name": "copy", "T": 4, "n_digits": 2, "n_symbols": 3},
    "model": {"kind": "sab", "hidden": 5, "k_top": 2, "k_att": 2},
    "routing": {"method": "sparse_replay", "k_trunc": 3},
    "optim": {"lr": 0.02},
    "run": {"steps": 12, "batch_size": 4, "dtype": "float64", "checkpoint_every": 6,
            "log_every": 4, "eval_size": 4, "eval_batch": 4, "threads": 1},
}  # fmt: skip
LM = {
    "task": {"name": "lm_recall", "segments": 3, "items": 2, "values": 3},
    "model": {"kind": "memformer_lm", "dim": 8, "heads": 2, "layers": 1, "slots": 2,
              "ffn_mult": 1},
    "routing": {"method": "mrbp"},
    "optim": {"lr": 0.02},
    "run": {"steps": 10, "batch_size": 4, "dtype": "float64", "log_every": 5,
            "eval_size": 4, "eval_batch": 4, "threads": 1},
}  # fmt: skip
# name -> (config, fast): the compiled SAB step, the generic SAB replay, the LM's MRBP.
CASES = {"sab_fast": (SAB, True), "sab_generic": (SAB, False), "lm_mrbp": (LM, False)}
SAB_TOML = """
[task]
name = "copy"
T = 4
n_digits = 2
n_symbols = 3
[model]
kind = "sab"
hidden = 5
k_top = 2
k_att = 2
[routing]
method = "sparse_replay"
k_trunc = 3
[optim]
lr = 0.02
[run]
steps = 12
batch_size = 4
dtype = "float64"
checkpoint_every = 6
log_every = 4
eval_size = 4
eval_batch = 4
threads = 1
"""


def _torch_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """One gloo rank: every case of CASES through memcore.train.train, all-reduces counted."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    calls: list[int] = []
    real = dist.all_reduce

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    dist.all_reduce = counted
    try:
        counts = {}
        for name, (data, fast) in CASES.items():
            before = len(calls)
            res = train(parse_config(data), backend="torch", out=f"{out}/{name}", fast=fast)
            counts[name] = (len(calls) - before, res["steps_done"])
        pathlib.Path(f"{out}/counts{rank}.json").write_text(json.dumps(counts))
        dist.barrier()  # no rank tears gloo down while the other is still at work
    finally:
        dist.all_reduce = real
        dist.destroy_process_group()


def _assert_same_run(got: pathlib.Path, want: pathlib.Path, rtol: float = 1e-10) -> None:
    a = json.loads((got / "results.json").read_text())["history"]
    b = json.loads((want / "results.json").read_text())["history"]
    assert json.loads((want / "results.json").read_text())["replicas"] == 1
    assert a["step"] == b["step"]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=0, err_msg=key)
    ca, cb = load_checkpoint(got / "checkpoint.npz"), load_checkpoint(want / "checkpoint.npz")
    assert ca.step == cb.step
    for name in cb.params:
        np.testing.assert_allclose(ca.params[name], cb.params[name], rtol=rtol, atol=1e-13)
        np.testing.assert_allclose(ca.adam_m[name], cb.adam_m[name], rtol=rtol, atol=1e-16)
        np.testing.assert_allclose(ca.adam_v[name], cb.adam_v[name], rtol=rtol, atol=1e-20)


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_torch_ranks_equal_one_process(tmp_path):
    """2 gloo ranks at B/2 (compiled SAB step, generic SAB replay, Memformer LM MRBP) give
    one process's loss curve, gradient norms and parameters at B, with one all-reduce per
    step (per MRBP rollout, per sparse-replay step) on each rank."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("needs torch.distributed (gloo)")
    ranks = tmp_path / "ranks"
    mp.spawn(_torch_worker, args=(2, str(tmp_path / "init"), str(ranks)), nprocs=2, join=True)
    for rank in (0, 1):
        counts = json.loads((ranks / f"counts{rank}.json").read_text())
        for name, (reduces, steps) in counts.items():
            want_steps = CASES[name][0]["run"]["steps"]
            assert steps == want_steps and reduces == steps, (rank, name, reduces, steps)
    one = tmp_path / "one"
    for name, (data, fast) in CASES.items():
        train(parse_config(data), backend="torch", out=str(one / name), fast=fast)
        _assert_same_run(ranks / name, one / name)
        assert json.loads((ranks / name / "results.json").read_text())["replicas"] == 2


def test_bad_data_parallel_setups(monkeypatch, tmp_path):
    """--devices off JAX, with --device, for Memformer, too many, off the compiled step, an
    uneven global batch, and torch ranks on another backend are refused before training."""
    cfg = parse_config(SAB)
    with pytest.raises(MemcoreError, match="`--devices` shards the batch over JAX devices"):
        train(cfg, backend="numpy", devices="all")
    if HAS_JAX:
        with pytest.raises(MemcoreError, match="`--device` and `--devices` exclude"):
            train(cfg, backend="jax", device="cpu", devices="all")
        with pytest.raises(MemcoreError, match=r"`--devices` must be 'all' or an integer"):
            train(cfg, backend="jax", devices="99")
        with pytest.raises(MemcoreError, match="`--devices` trains SAB models"):
            train(parse_config(LM), backend="jax", devices="all")
        with pytest.raises(MemcoreError, match="`--devices` needs the compiled JAX SAB step"):
            train(cfg, backend="jax", devices="all", fast=False, out=str(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(MemcoreError, match="need --backend torch"):
        train(cfg, backend="numpy")
    if HAS_TORCH:
        odd = copy.deepcopy(SAB)
        odd["run"]["batch_size"] = 3
        with pytest.raises(MemcoreError, match=r"`run.batch_size` must be divisible by .* \(2\)"):
            train(parse_config(odd), backend="torch")


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_torchrun_cli_and_bench_smoke(tmp_path):
    """``torchrun --nproc-per-node 2 -m memcore train`` (env rendezvous, gloo) trains as one
    process does, rank 0 alone reporting, and resumes on one process; bench.scaling_dp runs
    its CPU smoke (both workloads, every mode at N = 1, no errors)."""
    from bench import scaling_dp

    cfg = tmp_path / "sab.toml"
    cfg.write_text(SAB_TOML)
    assert parse_config(SAB) == parse_config(__import__("tomllib").loads(SAB_TOML))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "memcore", "train", str(cfg), "--backend", "torch", "--out",
           str(tmp_path / "ranks"), "--stop-after", "7", "--quiet"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("stopped at step 7/12") == 1, proc.stdout
    train(parse_config(SAB), backend="torch", out=str(tmp_path / "ranks"), resume=True)
    train(parse_config(SAB), backend="torch", out=str(tmp_path / "one"))
    _assert_same_run(tmp_path / "ranks", tmp_path / "one")
    res = scaling_dp.main(["--smoke", "--out", str(tmp_path / "dp.json")])
    got = {(r["workload"], r["mode"]) for r in res["rows"] if "error" not in r}
    want = {("lm_mrbp", m) for m in ("none", "reduce", "ddp")}
    assert got == want | {("sab_copy", "none"), ("sab_copy", "reduce")}, res["rows"]
    assert set(res["overhead_at_1"]) == {"lm_mrbp/reduce", "lm_mrbp/ddp", "sab_copy/reduce"}


_JAX_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    from memcore.train import parse_config, train
    from memcore.train.distributed import jax_mesh
    from memcore.train.fast_jax import device_batch, init_state, make_train_step

    data, out = json.loads(sys.argv[1]), sys.argv[2]
    cfg = parse_config(data)
    assert len(jax.devices()) == 2, jax.devices()
    train(cfg, backend="jax", out=out + "/one")
    train(cfg, backend="jax", out=out + "/mesh", devices="all")
    train(cfg, backend="jax", out=out + "/resume", devices=2, stop_after=5)
    train(cfg, backend="jax", out=out + "/resume", resume=True)  # finished on one device
    step = make_train_step(cfg, "float64", mesh=jax_mesh("all"))
    params, opt = init_state(cfg, "float64")
    hlo = step.lower(params, opt, *device_batch(cfg, 0, "float64")).compile().as_text()
    ops = ("all-reduce(", "all-gather(", "reduce-scatter(", "collective-permute(", "all-to-all(")
    print(json.dumps({op: hlo.count(" " + op) for op in ops}))
    """
)


@pytest.mark.skipif(not HAS_JAX, reason="needs jax")
def test_jax_mesh_equals_one_device(tmp_path):
    """A 2-device host mesh (batch sharded, params replicated) gives one device's loss curve,
    gradient norms and parameters, with one all-reduce per step and no other collective;
    a mesh run resumes on one device to the same end."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
    env.update(JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
    data = copy.deepcopy(SAB)
    proc = subprocess.run(
        [sys.executable, "-c", _JAX_SCRIPT, json.dumps(data), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts == {"all-reduce(": 1, "all-gather(": 0, "reduce-scatter(": 0,
                      "collective-permute(": 0, "all-to-all(": 0}, counts  # fmt: skip
    _assert_same_run(tmp_path / "mesh", tmp_path / "one")
    _assert_same_run(tmp_path / "resume", tmp_path / "one")
