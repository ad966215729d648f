"""SAB training speed against plain-LSTM baselines, one run (issue 14, item 3).

    python -m bench.sab_speed --out bench/results/sab-speed.json             # GPU, torch
    python -m bench.sab_speed --backend jax --out bench/results/sab-speed-jax.json

Copy task of ``configs/copy_sab_t100.toml`` (T = 100: sequences of T + 20 steps, scalar
input, 10 classes, batch 64, hidden 128, Adam with clipping). Rows, each timed as training
steps per second (warm-up excluded, device synchronised), all measured in this run:

- ``lstmcell_graph``: a plain ``nn.LSTMCell`` loop, full BPTT, linear head, cross-entropy,
  ``clip_grad_norm_`` and ``Adam(capturable=True)``, the whole step one CUDA graph (eager on
  the CPU): the baseline of the SAB goal.
- ``cudnn_lstm``: ``nn.LSTM`` (cuDNN on the GPU), full BPTT, same head, loss and optimizer.
- ``memcore_sab``: memcore's training step of copy_sab_t100 (sparse replay, k_trunc 5,
  k_top 5, k_att 2) as ``memcore train`` runs it (``memcore.train.fast_torch.TrainStep``,
  or ``memcore.train.fast_jax`` with ``--backend jax``), batches copied in every step.
- ``memcore_sab_whole``: the same gradient from the whole masked graph (routing sab_bptt).
- ``memcore_lstm_bptt``: memcore's plain LSTM (copy_bptt_t100: memory off, full BPTT).
- ``transfer_eval``: the transfer evaluation, 512 sequences at T = 5000, forward only
  (seconds, not steps/s).

Goals printed with the ratios: memcore_sab >= 1.0x lstmcell_graph; memcore_lstm_bptt >= 0.5x
cudnn_lstm; transfer_eval < 10 s.
"""

from __future__ import annotations

import argparse
import pathlib
import time
from typing import Any

import attrs
import numpy as np
import torch

from bench.harness import run_record, write_json
from memcore.train.config import TrainConfig, load_config
from memcore.train.tasks import STREAM_TRAIN, batch_rng, make_batch

__all__ = ["baseline_step", "main", "memcore_step", "parser", "sized_config"]

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def sized_config(name: str, args: argparse.Namespace, method: str | None = None) -> TrainConfig:
    """configs/<name>.toml with the benchmark's T, batch, hidden and dtype."""
    cfg = load_config(CONFIGS / f"{name}.toml")
    routing = cfg.routing if method is None else attrs.evolve(cfg.routing, method=method)
    return attrs.evolve(
        cfg,
        task=attrs.evolve(cfg.task, T=args.T, transfer_T=()),
        model=attrs.evolve(cfg.model, hidden=args.hidden),
        routing=routing,
        run=attrs.evolve(
            cfg.run,
            batch_size=args.batch,
            dtype=args.dtype,
            eval_size=args.transfer_n,
            eval_batch=args.transfer_n,
        ),
    )


def _batches(cfg: TrainConfig, n: int = 4) -> list[Any]:
    return [
        make_batch(cfg.task, batch_rng(cfg.run.seed, STREAM_TRAIN, i), cfg.run.batch_size)
        for i in range(n)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(step, device, steps: int, warmup: int, sync=None) -> dict[str, float]:
    """Steps per second of ``step(i)`` over ``steps`` calls after ``warmup`` calls."""
    sync = sync or (lambda: _sync(device))
    for i in range(warmup):
        step(i)
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    sync()
    elapsed = time.perf_counter() - t0
    return {"steps_per_s": steps / elapsed, "seconds": elapsed, "steps": steps}


# ----------------------------------------------------------------------------- baselines
def baseline_step(kind: str, cfg: TrainConfig, device: torch.device, graph: bool):
    """A plain-torch training step of the copy task: ``step(i)`` trains on batch i % 4.

    kind "lstmcell": an nn.LSTMCell loop (captured whole as a CUDA graph when ``graph``);
    kind "cudnn": nn.LSTM over the sequence.
    """
    torch.manual_seed(0)
    batches = _batches(cfg)
    dt = getattr(torch, cfg.run.dtype)
    L, B, I = batches[0].xs.shape
    C, H = cfg.task.n_symbols + 2, cfg.model.hidden
    rnn = (torch.nn.LSTMCell(I, H) if kind == "lstmcell" else torch.nn.LSTM(I, H)).to(device, dt)
    head = torch.nn.Linear(H, C).to(device, dt)
    params = [*rnn.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.optim.lr, capturable=graph)
    host = [
        (torch.from_numpy(b.xs).to(dt), torch.from_numpy(b.targets.astype(np.int64)))
        for b in batches
    ]
    if device.type == "cuda":
        host = [(x.pin_memory(), y.pin_memory()) for x, y in host]
    xs = torch.zeros((L, B, I), dtype=dt, device=device)
    ys = torch.zeros((L, B), dtype=torch.int64, device=device)

    def body() -> None:
        if kind == "lstmcell":
            h = c = torch.zeros(B, H, dtype=dt, device=device)
            outs = []
            for t in range(L):
                h, c = rnn(xs[t], (h, c))
                outs.append(h)
            out = torch.stack(outs)
        else:
            out, _ = rnn(xs)
        loss = torch.nn.functional.cross_entropy(head(out).reshape(-1, C), ys.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_norm)
        opt.step()

    g = None
    if graph:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                body()
        torch.cuda.current_stream(device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(g):
            body()

    def step(i: int) -> None:
        x, y = host[i % len(host)]
        xs.copy_(x, non_blocking=True)
        ys.copy_(y, non_blocking=True)
        if g is not None:
            g.replay()
        else:
            opt.zero_grad(set_to_none=True)
            body()

    return step


# ----------------------------------------------------------------------------- memcore
def memcore_step(cfg: TrainConfig, backend: str, device: torch.device):
    """memcore's training step as ``memcore train`` runs it: ``step(i)`` on batch i % 4."""
    batches = _batches(cfg)
    if backend == "jax":
        from memcore.train import fast_jax

        params, opt = fast_jax.init_state(cfg, cfg.run.dtype)
        fn = fast_jax.make_train_step(cfg, cfg.run.dtype, donate=device.type == "cuda")
        data = [fast_jax.device_batch(cfg, i, cfg.run.dtype) for i in range(len(batches))]
        state = {"p": params, "o": opt, "loss": None}

        def step(i: int) -> None:
            state["p"], state["o"], state["loss"], _ = fn(state["p"], state["o"], *data[i % 4])

        return step, lambda: state["loss"].block_until_ready()
    from memcore.train.fast_torch import TrainStep
    from memcore.train.model import init_params
    from memcore.train.optim import adam_init

    params = init_params(cfg, np.random.default_rng(0))
    ts = TrainStep(cfg, params, adam_init(params), dtype=cfg.run.dtype, device=str(device))
    return (lambda i: ts(batches[i % 4])), None


def transfer_eval(cfg: TrainConfig, backend: str, device: torch.device, T: int) -> dict[str, Any]:
    """Seconds for the transfer evaluation (run.eval_size sequences at length T, forward only)."""
    from memcore.train.model import init_params

    params = init_params(cfg, np.random.default_rng(0))
    if backend == "jax":
        from memcore.train import fast_jax

        p, _ = fast_jax.init_state(cfg, cfg.run.dtype)
        run = lambda: fast_jax.evaluate(cfg, p, T=T, dtype=cfg.run.dtype)
    else:
        from memcore.train import fast_torch

        dt = getattr(torch, cfg.run.dtype)
        p = {k: torch.as_tensor(v, dtype=dt, device=device) for k, v in params.items()}
        run = lambda: fast_torch.evaluate(
            cfg, p, T=T, dtype=cfg.run.dtype, device=str(device)
        )
    t0 = time.perf_counter()
    metrics = run()
    _sync(device)
    return {"seconds": time.perf_counter() - t0, "T": T, "sequences": cfg.run.eval_size, **metrics}


# ----------------------------------------------------------------------------- main
def parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", choices=("torch", "jax"), default="torch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--T", type=int, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=50, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--transfer-T", type=int, default=5000)
    p.add_argument("--transfer-n", type=int, default=512)
    p.add_argument("--rows", default="lstmcell_graph,cudnn_lstm,memcore_sab,memcore_sab_whole,"
                   "memcore_lstm_bptt,transfer_eval")  # fmt: skip
    p.add_argument("--out", default=None)
    return p


def _row(name: str, args, device) -> dict[str, Any]:
    graph = device.type == "cuda"
    if name == "transfer_eval":
        cfg = sized_config("copy_sab_t100", args)
        return transfer_eval(cfg, args.backend, device, args.transfer_T)
    if name in ("lstmcell_graph", "cudnn_lstm"):
        cfg = sized_config("copy_bptt_t100", args)
        kind = "lstmcell" if name == "lstmcell_graph" else "cudnn"
        step = baseline_step(kind, cfg, device, graph and kind == "lstmcell")
        return _rate(step, device, args.steps, args.warmup)
    cfg = {
        "memcore_sab": ("copy_sab_t100", None),
        "memcore_sab_whole": ("copy_sab_t100", "sab_bptt"),
        "memcore_lstm_bptt": ("copy_bptt_t100", None),
    }[name]
    step, sync = memcore_step(sized_config(cfg[0], args, cfg[1]), args.backend, device)
    return _rate(step, device, args.steps, args.warmup, sync)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and writes to --out) the JSON payload."""
    args = parser().parse_args(argv)
    device = torch.device(args.device)
    payload: dict[str, Any] = {
        "benchmark": "sab_speed",
        "record": run_record(["jax"] if args.backend == "jax" else []),
        "args": vars(args),
        "rows": {},
    }
    for name in args.rows.split(","):
        try:
            payload["rows"][name] = _row(name, args, device)
        except Exception as exc:  # noqa: BLE001 - keep the other rows; the failure is in the JSON
            payload["rows"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(name, payload["rows"][name], flush=True)
        write_json(args.out, payload)
    payload["goals"] = goals(payload["rows"])
    for line in payload["goals"]["lines"]:
        print(line)
    write_json(args.out, payload)
    return payload


def goals(rows: dict[str, Any]) -> dict[str, Any]:
    """The issue's ratios and whether each goal is met (None when a row is missing)."""

    def rate(name: str) -> float | None:
        return rows.get(name, {}).get("steps_per_s")

    out: dict[str, Any] = {"lines": []}
    for key, num, den, goal in (
        ("sab_vs_lstmcell_graph", "memcore_sab", "lstmcell_graph", 1.0),
        ("sab_whole_vs_lstmcell_graph", "memcore_sab_whole", "lstmcell_graph", 1.0),
        ("lstm_bptt_vs_cudnn", "memcore_lstm_bptt", "cudnn_lstm", 0.5),
    ):
        a, b = rate(num), rate(den)
        ratio = None if a is None or b is None else a / b
        out[key] = {"ratio": ratio, "goal": goal, "met": None if ratio is None else ratio >= goal}
        if ratio is not None:
            line = f"{num} / {den} = {a:.2f} / {b:.2f} = {ratio:.3f}x (goal >= {goal}x)"
            out["lines"].append(line)
    sec = rows.get("transfer_eval", {}).get("seconds")
    met = None if sec is None else sec < 10.0
    out["transfer_eval_s"] = {"seconds": sec, "goal": 10.0, "met": met}
    if sec is not None:
        out["lines"].append(f"transfer_eval {sec:.2f} s (goal < 10 s)")
    return out


if __name__ == "__main__":
    main()
