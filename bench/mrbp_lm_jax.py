"""MRBP vs BPTT vs per-step checkpointing on the Memformer-lite LM, in JAX (issue 7, bench 1).

    python -m bench.mrbp_lm_jax --T 8,32 --precision fp32,bf16 --out bench/results/mrbp-lm-jax-h200.json

The same LM as ``bench/lm_model.py`` (embedding; ``layers`` pre-norm layers of causal
self-attention, memory read and FFN; memory write after the last layer; linear head), as
pure functions of a parameter pytree. From memcore: the memory read and write
(``backends/jax/modules.py``: ``init_reader``/``reader``, ``init_writer``/``writer``,
``writer_initial_memory``). Written here: embedding, LayerNorm, self-attention
(``jax.nn.dot_product_attention``), FFN, head, loss and the gradient routing. Methods
(each returns (loss, grads), grads in float32 like the master parameters):

- ``bptt``: ``jax.value_and_grad`` of one ``lax.scan`` over the T segments.
- ``checkpoint``: the same scan over ``jax.checkpoint(step)`` (default policy, the
  ``torch.utils.checkpoint`` analogue): the forward also runs the head and loss.
- ``mrbp_scan``: the scan over ``jax.checkpoint(step, policy=nothing_saveable,
  prevent_cse=False)``, the formulation of memcore's ``routing.mrbp(method="checkpoint")``.
- ``mrbp_vjp``: Memformer Alg. 1 in one jit: a memory-path-only forward scan (no head, no
  loss) storing M_0..M_{T-1}, then a reverse ``lax.scan`` whose body is ``jax.vjp`` of one
  segment with cotangent (dM_{t+1}, 1/T); parameter gradients accumulate in float32.
- ``mrbp_replay``: Alg. 1 driven from Python: jitted advance, jitted per-segment VJP.

bf16 is mixed precision: float32 master parameters, cast to bf16 once per iteration;
LayerNorm, softmax and the loss in float32; memcore's read/write upcast bf16 to float32
inside (their ``upcast_halves``), so only self-attention, FFN and head run in bf16; the
memory carries are bf16. fp32 uses JAX's default matmul precision (TF32 on Hopper).
Peak memory is ``peak_bytes_in_use`` of the device allocator; it cannot be reset, so each
(method, precision) runs in its own process, T ascending (peaks grow with T). Run with
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
from jax import lax
from memcore.backends.jax.modules import (
    init_reader,
    init_writer,
    reader,
    writer,
    writer_initial_memory,
)

__all__ = ["METHODS", "init_params", "main", "make_method", "random_batch", "run_worker"]

METHODS = ("bptt", "checkpoint", "mrbp_scan", "mrbp_vjp", "mrbp_replay")
DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
F32 = jnp.float32


# ----------------------------------------------------------------------------- model
def _dense(key, fan_in: int, fan_out: int) -> jax.Array:
    bound = (3.0 / fan_in) ** 0.5
    return jax.random.uniform(key, (fan_in, fan_out), F32, -bound, bound)


def init_params(key: jax.Array, a: argparse.Namespace) -> dict[str, Any]:
    """Float32 parameters: emb (C, D), layers, write (memcore writer), head (D, C)."""
    D, ones, zeros = a.D, jnp.ones((a.D,), F32), jnp.zeros((a.D,), F32)
    keys = jax.random.split(key, a.layers + 3)
    layers = []
    for k in keys[: a.layers]:
        k1, k2, k3, k4, k5 = jax.random.split(k, 5)
        layers.append({
            "ln1": (ones, zeros), "qkv": _dense(k1, D, 3 * D), "proj": _dense(k2, D, D),
            "ln2": (ones, zeros), "read": init_reader(k3, D),
            "ln3": (ones, zeros), "fc1": _dense(k4, D, 4 * D), "fc1_b": jnp.zeros((4 * D,), F32),
            "fc2": _dense(k5, 4 * D, D), "fc2_b": zeros,
        })  # fmt: skip
    return {
        "emb": jax.random.normal(keys[-3], (a.vocab, D), F32),
        "layers": layers,
        "ln_w": (ones, zeros),
        "write": init_writer(keys[-2], a.K, D),
        "ln_o": (ones, zeros),
        "head": _dense(keys[-1], D, a.vocab),
    }


def _ln(x: jax.Array, gb: tuple[jax.Array, jax.Array]) -> jax.Array:
    x32 = x.astype(F32)
    mu = jnp.mean(x32, -1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mu), -1, keepdims=True)
    y = (x32 - mu) * lax.rsqrt(var + 1e-5) * gb[0].astype(F32) + gb[1].astype(F32)
    return y.astype(x.dtype)


def _layer(p: dict[str, Any], x: jax.Array, memory: jax.Array, heads: int) -> jax.Array:
    """x += SelfAttn(LN x); x += MemoryRead(LN x, M); x += FFN(LN x): (B, L, D)."""
    b, n, d = x.shape
    q, k, v = jnp.split(_ln(x, p["ln1"]) @ p["qkv"], 3, axis=-1)
    q, k, v = (t.reshape(b, n, heads, d // heads) for t in (q, k, v))
    x = x + jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, n, d) @ p["proj"]
    x = x + reader(p["read"], _ln(x, p["ln2"]), memory, num_heads=heads)
    h = jax.nn.gelu(_ln(x, p["ln3"]) @ p["fc1"] + p["fc1_b"], approximate=False)
    return x + h @ p["fc2"] + p["fc2_b"]


def _encode(p, memory, tokens, heads: int) -> jax.Array:
    x = p["emb"][tokens]
    for lp in p["layers"]:
        x = _layer(lp, x, memory, heads)
    return x


def _mem_write(p, memory, x, heads: int, tau: float) -> jax.Array:
    return writer(p["write"], memory, _ln(x, p["ln_w"]), num_heads=heads, tau=tau)


def advance(p, memory, tokens, *, heads: int, tau: float) -> jax.Array:
    """The memory path alone (no head, no loss): M_{t+1} (B, K, D)."""
    return _mem_write(p, memory, _encode(p, memory, tokens, heads), heads, tau)


def segment(p, memory, tokens, targets, *, heads: int, tau: float):
    """(M_{t+1} (B, K, D), mean next-token cross-entropy) of one segment, tokens (B, L)."""
    x = _encode(p, memory, tokens, heads)
    logits = (_ln(x, p["ln_o"]) @ p["head"]).astype(F32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    loss = -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
    return _mem_write(p, memory, x, heads, tau), loss


def _cast(params, dtype):
    return jax.tree_util.tree_map(lambda w: w.astype(dtype), params)


def _start(params, batch: int, dtype):
    pc = _cast(params, dtype)
    return pc, writer_initial_memory(pc["write"], batch).astype(dtype)


def _f32_add(acc, g):
    return jax.tree_util.tree_map(lambda a, b: a + b.astype(F32), acc, g)


# ----------------------------------------------------------------------------- methods
def _scan_loss(params, tokens, targets, *, cfg, dtype, remat):
    pc, m0 = _start(params, tokens.shape[1], dtype)
    step = functools.partial(segment, **cfg)
    if remat == "checkpoint":
        step = jax.checkpoint(step)
    elif remat == "mrbp_scan":  # keeps only each step's inputs: the memory carries M_t
        step = jax.checkpoint(
            step, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable
        )
    _, losses = lax.scan(lambda m, tt: step(pc, m, *tt), m0, (tokens, targets))
    return jnp.mean(losses)


def _mrbp_vjp(params, tokens, targets, *, cfg, dtype):
    """Memformer Alg. 1 in one program: memories-only forward, reverse scan of VJPs."""
    T = tokens.shape[0]
    pc, init_pull = jax.vjp(lambda p: _start(p, tokens.shape[1], dtype), params)
    m0 = pc[1]
    pc = lax.stop_gradient(pc[0])
    adv = functools.partial(advance, **cfg)
    _, ms = lax.scan(lambda m, tok: (adv(pc, m, tok), m), m0, tokens)  # ms[t] = M_t

    def back(carry, inp):
        d_m, acc = carry
        m_t, tok, tgt = inp
        (_, loss), pull = jax.vjp(lambda p, m: segment(p, m, tok, tgt, **cfg), pc, m_t)
        g, d_mt = pull((d_m, jnp.asarray(1.0 / T, F32)))
        return (d_mt, _f32_add(acc, g)), loss

    zeros = jax.tree_util.tree_map(lambda w: jnp.zeros(w.shape, F32), pc)
    (d_m0, acc), losses = lax.scan(
        back, (jnp.zeros_like(m0), zeros), (ms, tokens, targets), reverse=True
    )
    zero_pc = jax.tree_util.tree_map(jnp.zeros_like, pc)
    (g_init,) = init_pull((zero_pc, d_m0))  # dM_0 through M_0 = normalize(v_bias)
    return jnp.mean(losses), _f32_add(acc, g_init)


class _Replay:
    """Alg. 1 from Python: jitted advance and per-segment VJP, M_{t+1} freed as it is used."""

    def __init__(self, cfg, dtype):
        self.start = jax.jit(functools.partial(_start, dtype=dtype), static_argnums=1)
        self.adv = jax.jit(functools.partial(advance, **cfg))

        def vjp_step(pc, m_t, tok, tgt, d_m, w, acc):
            (_, loss), pull = jax.vjp(lambda p, m: segment(p, m, tok, tgt, **cfg), pc, m_t)
            g, d_mt = pull((d_m, w))
            return loss, d_mt, _f32_add(acc, g)

        self.vjp = jax.jit(vjp_step, donate_argnums=(6,))

        def finish(params, d_m0):
            _, pull = jax.vjp(lambda p: _start(p, d_m0.shape[0], dtype)[1], params)
            return pull(d_m0)[0]

        self.finish = jax.jit(finish)
        self.add = jax.jit(_f32_add, donate_argnums=(0,))

    def __call__(self, params, tokens, targets):
        T = tokens.shape[0]
        pc, m0 = self.start(params, tokens.shape[1])
        ms = [m0]
        for t in range(T):
            ms.append(self.adv(pc, ms[-1], tokens[t]))
        acc = jax.tree_util.tree_map(lambda w: jnp.zeros(w.shape, F32), pc)
        d_m, w, total = jnp.zeros_like(m0), jnp.asarray(1.0 / T, F32), 0.0
        for t in reversed(range(T)):
            ms[t + 1] = None
            loss, d_m, acc = self.vjp(pc, ms[t], tokens[t], targets[t], d_m, w, acc)
            total = total + loss
        return total / T, self.add(acc, self.finish(params, d_m))


def make_method(name: str, a: argparse.Namespace, dtype) -> Any:
    """A callable (params, tokens, targets) -> (loss, grads) for method ``name``."""
    cfg = {"heads": a.H, "tau": a.tau}
    if name == "mrbp_replay":
        return _Replay(cfg, dtype)
    if name == "mrbp_vjp":
        return jax.jit(functools.partial(_mrbp_vjp, cfg=cfg, dtype=dtype))
    remat = None if name == "bptt" else name
    fn = functools.partial(_scan_loss, cfg=cfg, dtype=dtype, remat=remat)
    return jax.jit(jax.value_and_grad(fn))


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
    if method == "mrbp_replay":
        return fn, None, None
    t0 = time.perf_counter()
    comp = fn.lower(params, tokens, targets).compile()
    secs = time.perf_counter() - t0
    ma = comp.memory_analysis()
    names = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")
    return comp, (None if ma is None else {n: getattr(ma, n, None) for n in names}), secs


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


def _ratios(rows: list[dict]) -> None:
    base = {(r["precision"], r["T"]): r for r in rows if r["method"] == "bptt" and "median_s" in r}
    for r in rows:
        b = base.get((r.get("precision"), r.get("T")))
        if b is None or "median_s" not in r:
            continue
        r["speed_vs_bptt"] = b["median_s"] / r["median_s"]
        if r.get("peak_bytes") and b.get("peak_bytes"):
            r["memory_vs_bptt"] = r["peak_bytes"] / b["peak_bytes"]
            added, b_added = r["peak_bytes"] - r["base_bytes"], b["peak_bytes"] - b["base_bytes"]
            r["added_bytes"], r["added_vs_bptt"] = added, added / b_added


def markdown(rows: list[dict]) -> str:
    """The results table in Markdown (GiB = 2**30 bytes)."""
    head = ("| precision | T | method | s/iter | speed vs BPTT | peak GiB | memory vs BPTT | "
            "added vs BPTT | XLA temp GiB | compile s | grad rel err vs BPTT |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    g = lambda v: "-" if v is None else f"{v / 2**30:.2f}"
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('precision')} | | {r['method']} | error: {r['error'][-80:]!r} |")
            continue
        temp = (r.get("xla_memory") or {}).get("temp_size_in_bytes")
        comp = "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}"
        lines.append(
            f"| {r['precision']} | {r['T']} | {r['method']} | {r['median_s']:.4f} | "
            f"{r.get('speed_vs_bptt', float('nan')):.2f}x | {g(r.get('peak_bytes'))} | "
            f"{r.get('memory_vs_bptt', float('nan')):.3f}x | {r.get('added_vs_bptt', float('nan')):.3f}x | "
            f"{g(temp)} | {comp} | {r['grad_rel_err_vs_bptt']:.1e} |"
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
                    rows += run_worker(a, m, precision, work)
                else:
                    rows += _spawn(argv, m, precision, work, a.worker_timeout)
                _write(a.out, payload)
        payload["exact_check"] = [r for r in rows if "check_T" in r]
        rows[:] = [r for r in rows if "check_T" not in r]
        _ratios(rows)
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
