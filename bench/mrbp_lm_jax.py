"""MRBP vs BPTT vs per-segment checkpointing on the Memformer LM, in JAX (issues 7 and 13).

    python -m bench.mrbp_lm_jax --T 8,32 --precision fp32,bf16 --out bench/results/mrbp-lm-jax-h200.json

The model is the library's (``memcore.backends.jax.memformer``: embedding; ``layers``
pre-norm layers of causal self-attention, memory read and FFN; memory write after the last
layer; linear head; M_0 = normalize(v_bias)), its ``segment_loss`` the step. The gradient
routing is the library's too (``memcore.backends.jax.mrbp_model``); the bench holds none.
Each method returns (mean loss over the T segments, grads) with ``loss_scale = 1 / T``:

- ``bptt``: ``mrbp_model.bptt``: ``jax.value_and_grad`` of one ``lax.scan``.
- ``checkpoint``: ``mrbp_model.checkpointed``: the scan over ``jax.checkpoint(step)``.
- ``mrbp``: ``mrbp_model.mrbp``: a memories-only forward scan storing M_0..M_{T-1}, then a
  reverse scan of per-segment ``jax.vjp`` (Memformer Alg. 1).
- ``mrbp_host``: ``mrbp`` with ``offload="host"``: the stored memories in pinned host memory.

bf16 is mixed precision: float32 master parameters, cast to bf16 inside the step (so the
gradients come back, and accumulate, in float32); memcore's read and write upcast bf16 to
float32 inside, the memory carries are bf16. fp32 uses JAX's default matmul precision
(TF32 on Hopper). Peak memory is ``peak_bytes_in_use`` of the device allocator, which
cannot be reset, so each (method, precision) runs in its own process, T ascending; with
``--inprocess`` (one process: CPU smoke runs, the issue-13 GPU run) the ratios use XLA's
own plan instead (``xla_peak_bytes`` = temp + arguments + outputs - aliased, from the
compiled program's ``memory_analysis()``), recorded in every mode. Run with
XLA_PYTHON_CLIENT_PREALLOCATE=false.

``--fit-gib G`` then finds the largest T each method fits in G GiB (fp32): T is predicted
from the linear fit of the measured peaks at the smallest and largest T, and a fresh worker
runs T and T * (1 + ``--fit-step``) (1 warm-up, ``--fit-repeat`` timed runs): the first must
peak at or under G GiB and the second above it for the bracket to hold. Gradients there
are not compared (BPTT cannot run at those T); they were at the T of the main table.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

from memcore.backends.jax import memformer, mrbp_model
from memcore.models import MemformerConfig

__all__ = ["METHODS", "init_params", "main", "make_method", "random_batch", "run_worker"]

METHODS = ("bptt", "checkpoint", "mrbp", "mrbp_host")
DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
F32 = jnp.float32


# ----------------------------------------------------------------------------- model
def config(a: argparse.Namespace) -> MemformerConfig:
    """The library model's config from the bench's flags."""
    return MemformerConfig(vocab=a.vocab, dim=a.D, heads=a.H, layers=a.layers, slots=a.K,
                           tau=a.tau)  # fmt: skip


def init_params(key: jax.Array, a: argparse.Namespace) -> dict[str, Any]:
    """Float32 parameters of the library's JAX Memformer LM."""
    return memformer.init(key, config(a), dtype=F32)


def _cast(params, dtype):
    return jax.tree_util.tree_map(lambda w: w.astype(dtype), params)


@functools.cache
def _model(cfg: MemformerConfig, batch: int, dtype) -> tuple[Any, Any]:
    """(step, memory0) for the drivers; cached so one (config, dtype) keeps one object each."""

    def step(p, memory, seg):
        return memformer.segment_loss(_cast(p, dtype), memory, seg, cfg)

    def memory0(p):
        return memformer.init_memory(_cast(p, dtype), batch, cfg)

    return step, memory0


# ----------------------------------------------------------------------------- methods
_DRIVERS = {
    "bptt": (mrbp_model.bptt, {}),
    "checkpoint": (mrbp_model.checkpointed, {}),
    "mrbp": (mrbp_model.mrbp, {}),
    "mrbp_host": (mrbp_model.mrbp, {"offload": "host"}),
}


def make_method(name: str, a: argparse.Namespace, dtype) -> Any:
    """A jitted callable (params, tokens, targets) -> (mean loss, grads) for method ``name``."""
    driver, opts = _DRIVERS[name]
    step, memory0 = _model(config(a), a.B, dtype)

    def run(params, tokens, targets):
        loss, grads, _ = driver(step, params, memory0, (tokens, targets),
                                loss_scale=1.0 / tokens.shape[0], **opts)  # fmt: skip
        return loss, grads

    return jax.jit(run)


def random_batch(T: int, a: argparse.Namespace, seed: int = 1):
    """Random token ids and next-token targets, (T, B, L) int32 each (never all zeros)."""
    stream = np.random.default_rng(seed).integers(0, a.vocab, (a.B, T * a.L + 1), dtype=np.int32)
    tok = stream[:, :-1].reshape(a.B, T, a.L).transpose(1, 0, 2)
    tgt = stream[:, 1:].reshape(a.B, T, a.L).transpose(1, 0, 2)
    return jnp.asarray(np.ascontiguousarray(tok)), jnp.asarray(np.ascontiguousarray(tgt))


# ----------------------------------------------------------------------------- worker
def _stats() -> dict[str, Any]:
    s = jax.devices()[0].memory_stats() or {}
    return {"bytes_in_use": s.get("bytes_in_use"), "peak_bytes_in_use": s.get("peak_bytes_in_use")}


def _host(grads) -> np.ndarray:
    return np.concatenate([np.asarray(g, np.float32).ravel() for g in jax.tree_util.tree_leaves(grads)])


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    d, w = got.astype(np.float64) - want, want.astype(np.float64)
    return float(np.sqrt(np.dot(d, d) / max(np.dot(w, w), 1e-300)))


def _compare(method: str, grads, ref_path: str, tol: float, what: str) -> float:
    g = _host(grads)
    if method == "bptt":
        np.save(ref_path, g)
        return 0.0
    err = _rel(g, np.load(ref_path))
    assert err < tol, f"{method} {what}: gradient rel error {err:.2e} vs BPTT >= {tol}"
    return err


def _compiled(method: str, a, dtype, params, tokens, targets):
    """(callable, XLA memory analysis or None, compile seconds)."""
    fn = make_method(method, a, dtype)
    t0 = time.perf_counter()
    comp = fn.lower(params, tokens, targets).compile()
    secs = time.perf_counter() - t0
    ma = comp.memory_analysis()
    names = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
             "alias_size_in_bytes", "host_temp_size_in_bytes")  # fmt: skip
    return comp, (None if ma is None else {n: getattr(ma, n, None) for n in names}), secs


def xla_peak_bytes(xla: dict | None) -> int | None:
    """Device bytes of XLA's plan: temp + arguments + outputs - aliased (None if unknown)."""
    if not xla or xla.get("temp_size_in_bytes") is None:
        return None
    keys = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")
    return sum(xla.get(k) or 0 for k in keys) - (xla.get("alias_size_in_bytes") or 0)


def run_worker(a: argparse.Namespace, method: str, precision: str, work_dir: str) -> list[dict]:
    """One method at one precision: exact check (fp32), then each T ascending; rows."""
    dtype, rows = DTYPES[precision], []
    params = init_params(jax.random.PRNGKey(a.seed), a)
    if precision == "fp32" and a.check_T > 0:
        tokens, targets = random_batch(a.check_T, a, seed=7)
        with jax.default_matmul_precision("highest"):
            run, _, _ = _compiled(method, a, dtype, params, tokens, targets)
            _, grads = run(params, tokens, targets)
        path = os.path.join(work_dir, "check.npy")
        err = _compare(method, grads, path, a.check_tol, f"exact check T={a.check_T}")
        rows.append({"method": method, "check_T": a.check_T, "rel_err_vs_bptt": err})
        del grads, run
    for T in sorted(int(t) for t in a.T.split(",")):
        row: dict[str, Any] = {"method": method, "precision": precision, "T": T}
        tokens, targets = random_batch(T, a)
        print(f"[{method} {precision} T={T}] compiling", flush=True)
        run, row["xla_memory"], row["compile_s"] = _compiled(method, a, dtype, params, tokens, targets)
        row["xla_peak_bytes"] = xla_peak_bytes(row["xla_memory"])
        print(f"[{method} {precision} T={T}] compiled in {row['compile_s']} s", flush=True)
        loss, grads = run(params, tokens, targets)
        row["loss"] = float(loss)
        tol = a.tol_fp32 if precision == "fp32" else a.tol_bf16
        ref = os.path.join(work_dir, f"bptt-{precision}-T{T}.npy")
        if a.fit_worker:  # no BPTT reference at the fitted T (see the module docstring)
            row["grad_rel_err_vs_bptt"] = None
        else:
            row["grad_rel_err_vs_bptt"] = _compare(method, grads, ref, tol, f"{precision} T={T}")
        del grads, loss
        row["base_bytes"] = _stats()["bytes_in_use"]
        samples = []
        for i in range(a.warmup + a.repeat):
            t0 = time.perf_counter()
            jax.block_until_ready(run(params, tokens, targets))
            if i >= a.warmup:
                samples.append(time.perf_counter() - t0)
        row.update(median_s=statistics.median(samples), min_s=min(samples), max_s=max(samples))
        row["samples_s"] = samples
        row["peak_bytes"] = _stats()["peak_bytes_in_use"]
        row["device"] = jax.devices()[0].device_kind
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "samples_s"}), flush=True)
        del run
    return rows


# ----------------------------------------------------------------------------- driver
def _spawn(argv: list[str], method: str, precision: str, work: str, timeout: float) -> list[dict]:
    out = os.path.join(work, f"rows-{method}-{precision}.json")
    cmd = [sys.executable, "-m", "bench.mrbp_lm_jax", *argv, "--worker", method,
           "--worker-precision", precision, "--work-dir", work, "--rows-out", out]  # fmt: skip
    err = os.path.join(work, f"stderr-{method}-{precision}.txt")
    sys.stdout.flush()
    try:  # the worker's stdout goes straight to ours: progress survives a timeout
        with open(err, "w") as f:
            proc = subprocess.run(cmd, timeout=timeout, stderr=f, text=True, check=False)
    except subprocess.TimeoutExpired:
        return [{"method": method, "precision": precision, "error": f"timeout {timeout} s"}]
    if proc.returncode != 0 or not os.path.exists(out):
        with open(err) as f:
            return [{"method": method, "precision": precision, "error": f.read()[-600:]}]
    with open(out) as f:
        return json.load(f)


def _inprocess(a: argparse.Namespace, method: str, precision: str, work: str) -> list[dict]:
    """run_worker in this process; a failing method (compile error, out of memory, a failed
    gradient check) becomes an error row and the run goes on, as with a worker process."""
    try:
        return run_worker(a, method, precision, work)
    except Exception as e:  # noqa: BLE001 - recorded in the results, not hidden
        print(f"[{method} {precision}] failed: {type(e).__name__}: {e}", flush=True)
        return [{"method": method, "precision": precision,
                 "error": f"{type(e).__name__}: {e}"[-600:]}]  # fmt: skip


def _ratios(rows: list[dict], inprocess: bool = False) -> None:
    """Speed and memory against BPTT at the same (precision, T). In one process the
    allocator's peak only grows, so there ``memory_vs_bptt`` is left out (XLA's plan stays)."""
    base = {(r["precision"], r["T"]): r for r in rows if r["method"] == "bptt" and "median_s" in r}
    for r in rows:
        b = base.get((r.get("precision"), r.get("T")))
        if b is None or "median_s" not in r:
            continue
        r["speed_vs_bptt"] = b["median_s"] / r["median_s"]
        if r.get("xla_peak_bytes") and b.get("xla_peak_bytes"):
            r["xla_memory_vs_bptt"] = r["xla_peak_bytes"] / b["xla_peak_bytes"]
        if not inprocess and r.get("peak_bytes") and b.get("peak_bytes"):
            r["memory_vs_bptt"] = r["peak_bytes"] / b["peak_bytes"]
            added, b_added = r["peak_bytes"] - r["base_bytes"], b["peak_bytes"] - b["base_bytes"]
            r["added_bytes"], r["added_vs_bptt"] = added, added / b_added


def markdown(rows: list[dict]) -> str:
    """The results table in Markdown (GiB = 2**30 bytes)."""
    head = ("| precision | T | method | s/iter | speed vs BPTT | peak GiB | memory vs BPTT | "
            "added vs BPTT | XLA plan GiB | XLA plan vs BPTT | XLA host temp GiB | compile s | "
            "grad rel err vs BPTT |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    g = lambda v: "-" if v is None else f"{v / 2**30:.2f}"
    x = lambda v, d=3: "-" if v is None else f"{v:.{d}f}x"
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('precision')} | | {r['method']} | error: {r['error'][-80:]!r} |")
            continue
        host = (r.get("xla_memory") or {}).get("host_temp_size_in_bytes")
        err = r["grad_rel_err_vs_bptt"]
        comp = "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}"
        lines.append(
            f"| {r['precision']} | {r['T']} | {r['method']} | {r['median_s']:.4f} | "
            f"{x(r.get('speed_vs_bptt'), 2)} | {g(r.get('peak_bytes'))} | "
            f"{x(r.get('memory_vs_bptt'))} | {x(r.get('added_vs_bptt'))} | "
            f"{g(r.get('xla_peak_bytes'))} | {x(r.get('xla_memory_vs_bptt'))} | "
            f"{g(host)} | {comp} | {'-' if err is None else f'{err:.1e}'} |"
        )
    return "\n".join(lines)


def _record(argv: list[str]) -> dict[str, Any]:
    return {
        "command": "python -m bench.mrbp_lm_jax " + " ".join(argv),
        "python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__,
        "jaxlib": getattr(__import__("jaxlib"), "__version__", None),
        "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip


def parser() -> argparse.ArgumentParser:
    """Command-line flags (sizes, methods, precisions, repeats, tolerances, output)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    for flag, default in (("B", 16), ("L", 128), ("D", 512), ("H", 8), ("K", 1024)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tau", type=float, default=0.25)
    p.add_argument("--T", default="8,32", help="comma-separated horizons")
    p.add_argument("--precision", default="fp32,bf16")
    p.add_argument("--methods", default=",".join(METHODS), help="bptt always runs first")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--check-T", type=int, default=2, help="0 skips the fp32 'highest' check")
    p.add_argument("--check-tol", type=float, default=1e-4)
    p.add_argument("--tol-fp32", type=float, default=2e-2)
    p.add_argument("--tol-bf16", type=float, default=1e-1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inprocess", action="store_true", help="no subprocesses (CPU smoke runs)")
    p.add_argument("--worker-timeout", type=float, default=150.0)
    p.add_argument("--out", default=None, help="JSON path")
    p.add_argument("--fit-gib", type=float, default=0.0, help="find the largest T in this many GiB")
    p.add_argument("--fit-step", type=float, default=0.05, help="bracket width of the fit")
    p.add_argument("--fit-repeat", type=int, default=1, help="timed runs at the fitted T")
    p.add_argument("--fit-max-T", type=int, default=4096)
    p.add_argument("--fit-rounds", type=int, default=3, help="prediction rounds of the fit")
    p.add_argument("--fit-from", default=None,
                   help="JSON of an earlier run: fit from its rows and fit runs, no new table")
    p.add_argument("--fit-worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--worker", "--worker-precision", "--work-dir", "--rows-out"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (or one worker); returns (and writes to --out) the JSON payload."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser().parse_args(argv)
    if a.worker:
        rows = run_worker(a, a.worker, a.worker_precision, a.work_dir)
        with open(a.rows_out, "w") as f:
            json.dump(rows, f)
        return {"rows": rows}
    methods = ["bptt"] + [m for m in a.methods.split(",") if m and m != "bptt"]
    if a.fit_from:
        return _fit_only(argv, a, methods)
    rows: list[dict] = []
    payload = {"benchmark": "mrbp_lm_jax", "record": _record(argv), "rows": rows,
               "sizes": {k: getattr(a, k) for k in ("B", "L", "D", "H", "K", "vocab", "layers")}}  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        for precision in a.precision.split(","):
            for m in methods:
                if a.inprocess:
                    rows += _inprocess(a, m, precision, work)
                else:
                    rows += _spawn(argv, m, precision, work, a.worker_timeout)
                _write(a.out, payload)
        payload["exact_check"] = [r for r in rows if "check_T" in r]
        rows[:] = [r for r in rows if "check_T" not in r]
        _ratios(rows, a.inprocess)
        payload["markdown"] = markdown(rows)
        print(payload["markdown"], flush=True)
        _write(a.out, payload)
        if a.fit_gib:
            payload["fit"] = fit_memory(argv, a, methods, rows, work)
            _write(a.out, payload)
    return payload


def _fit_only(argv: list[str], a, methods: list[str]) -> dict[str, Any]:
    """--fit-from: the fit alone, predicted from an earlier run's table and fit runs; the
    methods whose earlier fit is already bracketed are carried over, not run again."""
    with open(a.fit_from) as f:
        old = json.load(f)
    payload = {"benchmark": "mrbp_lm_jax", "record": _record(argv), "fit_from": a.fit_from,
               "rows": old.get("rows", [])}  # fmt: skip
    done = [f for f in old.get("fit", []) if f.get("fits") and f.get("above_exceeds")]
    todo = [m for m in methods if m not in {f["method"] for f in done}]
    with tempfile.TemporaryDirectory() as work:
        payload["fit"] = done + fit_memory(argv, a, todo, payload["rows"], work, old.get("fit", []))
    _write(a.out, payload)
    return payload


def _fit_points(method: str, rows: list[dict], fits: list[dict]) -> list[tuple[int, int]]:
    """(T, peak bytes) of every fp32 run of ``method``: table rows and earlier fit runs."""
    runs = [r for f in fits if f.get("method") == method for r in f.get("runs", [])]
    return sorted({(r["T"], r["peak_bytes"]) for r in [*rows, *runs]
                   if r.get("method") == method and r.get("precision", "fp32") == "fp32"
                   and r.get("peak_bytes")})  # fmt: skip


def fit_memory(
    argv: list[str], a, methods: list[str], rows: list[dict], work: str, earlier: list[dict] = ()
) -> list[dict]:
    """Largest T per method in ``--fit-gib`` GiB (fp32), bracketed by measured runs.

    XLA plans a program's memory statically, so the peak is linear in T: each round predicts
    T from the two largest T measured so far (table rows, ``earlier`` fit runs, this fit's
    runs) and runs T and T * (1 + step) in a fresh worker, until T fits and the other does
    not (at most ``--fit-rounds`` rounds)."""
    cap, fits = a.fit_gib * 2**30, []
    for m in methods:
        fit: dict[str, Any] = {"method": m, "runs": []}
        for _ in range(a.fit_rounds):
            pts = _fit_points(m, rows, [*earlier, fit])
            if len(pts) < 2:
                fit["error"] = f"{len(pts)} measured T (the fit needs two)"
                break
            (t0, m0), (t1, m1) = pts[-2], pts[-1]
            slope = (m1 - m0) / (t1 - t0)
            T = a.fit_max_T if slope <= 0 else min(a.fit_max_T, int(t1 + (cap - m1) / slope))
            Ts = [T, max(T + 1, math.ceil(T * (1 + a.fit_step)))]
            fit.update(bytes_per_segment=slope, predicted_T=T)
            sub = [*argv, "--T", ",".join(map(str, Ts)), "--precision", "fp32", "--check-T",
                   "0", "--repeat", str(a.fit_repeat), "--warmup", "1", "--fit-worker"]  # fmt: skip
            print(f"fit {a.fit_gib} GiB: {m} {slope / 2**20:.1f} MiB/segment -> T {Ts}", flush=True)
            got = _spawn(sub, m, "fp32", work, a.worker_timeout)
            fit["runs"] += got
            ok = [r for r in got if "peak_bytes" in r]
            if len(ok) != 2:
                break
            fit["fits"] = ok[0]["peak_bytes"] <= cap
            fit["above_exceeds"] = ok[1]["peak_bytes"] > cap
            if fit["fits"]:
                fit["T"] = T
                fit["tokens_per_s"] = T * a.B * a.L / ok[0]["median_s"]
            if fit["fits"] and fit["above_exceeds"]:
                break
        print(f"fit: {json.dumps({k: v for k, v in fit.items() if k != 'runs'})}", flush=True)
        fits.append(fit)
    return fits


def _write(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f, indent=1, default=str)


if __name__ == "__main__":
    main()
