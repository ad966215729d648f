"""JAX compiled SAB step: steps/s against the scans' ``unroll``, compile seconds, and the
T = 5000 transfer evaluation (compile and run timed apart). One GPU run picks
``memcore.train.fast_jax.default_unroll``; ratios are against the first unroll of the same
run. The SAB config is also timed as sab_bptt (sparse replay's gradient from the whole
masked graph: one forward instead of two, every step's residuals held).

    python -m bench.sab_jax_unroll --out bench/results/sab-jax-unroll.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import attrs
import numpy as np

CONFIGS = ("configs/copy_sab_t100.toml", "configs/copy_bptt_t100.toml")


def _time_step(cfg, unroll: int, steps: int) -> dict:
    import jax

    from memcore.train import fast_jax

    on_gpu = jax.devices()[0].platform != "cpu"
    fn = fast_jax.make_train_step(cfg, cfg.run.dtype, donate=on_gpu, unroll=unroll)
    params, opt = fast_jax.init_state(cfg, cfg.run.dtype)
    data = [fast_jax.device_batch(cfg, i, cfg.run.dtype) for i in range(4)]
    t0 = time.perf_counter()
    params, opt, loss, _ = fn(params, opt, *data[0])
    loss.block_until_ready()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        params, opt, loss, _ = fn(params, opt, *data[i % 4])
    loss.block_until_ready()
    rate = steps / (time.perf_counter() - t0)
    return {"unroll": unroll, "first_call_s": first, "steps_per_s": rate, "loss": float(loss)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--unrolls", default="1,2,4,8")
    p.add_argument("--T", type=int, default=5000)
    p.add_argument("--out", default="")
    args = p.parse_args()
    import jax

    from memcore.train import fast_jax
    from memcore.train.config import load_config

    rows = {"jax": jax.__version__, "device": str(jax.devices()[0]), "steps": {}, "transfer": {}}
    sab = load_config(CONFIGS[0])
    # The same gradient as sparse replay from the whole masked graph (one forward, more memory).
    as_bptt = attrs.evolve(sab, routing=attrs.evolve(sab.routing, method="sab_bptt"))
    cases = [(p, load_config(p)) for p in CONFIGS] + [("copy_sab_t100 as sab_bptt", as_bptt)]
    for path, cfg in cases:
        runs = [_time_step(cfg, int(u), args.steps) for u in args.unrolls.split(",")]
        base = runs[0]["steps_per_s"]
        for r in runs:
            r["ratio_vs_first"] = r["steps_per_s"] / base
            print(path, json.dumps(r), flush=True)
        rows["steps"][path] = runs
    cfg = load_config(CONFIGS[0])
    params, _ = fast_jax.init_state(cfg, cfg.run.dtype)
    for attempt in ("first (compile + run)", "second (run)"):
        t0 = time.perf_counter()
        metrics = fast_jax.evaluate(cfg, params, T=args.T, dtype=cfg.run.dtype)
        row = {"seconds": time.perf_counter() - t0, "sequences": cfg.run.eval_size, **metrics}
        rows["transfer"][attempt] = row
        print(f"transfer T={args.T} {attempt}", json.dumps(row), flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=1, default=float))
    assert np.isfinite(rows["transfer"]["second (run)"]["seconds"])


if __name__ == "__main__":
    main()
