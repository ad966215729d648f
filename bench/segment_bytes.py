"""What one LM segment's graph keeps for backward, block by block (issue 7, benchmark 1).

    python -m bench.segment_bytes --device cuda --out bench/results/segment-bytes-h200.json

The bytes autograd saves (distinct storages, counted with
``memcore.backends.torch.accounting.SavedBytes``; parameters, the memory M and each
block's inputs excluded, since they are held anyway) for each block of the Memformer-lite
LM's segment (the library's :class:`memcore.backends.torch.memformer.MemformerLM`): the
self-attention + memory read + FFN layers, the memory write, and the head with the loss;
then the whole segment without and with ``recompute`` (MRBP's replayed step under
``+layers``), and with every block but the write recomputed (``+lean``: the write's saved
tensors are alive only during its own backward, which runs first). This is the graph part
of a method's peak: what BPTT stores per segment and what MRBP holds for the one segment
it replays. Sizes default to the benchmark's (B=16, L=128, D=512, H=8, K=1024, vocab 8192,
4 layers), fp32.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from bench.harness import run_record, write_json
from bench.lm_model import MemformerLM
from memcore.backends.torch.accounting import SavedBytes

__all__ = ["main", "segment_bytes"]

MIB = 2**20


def segment_bytes(model: MemformerLM, tokens, targets, memory) -> dict[str, int]:
    """Saved bytes per block and for the whole segment (plain and with ``recompute``)."""
    params = list(model.parameters())
    out: dict[str, int] = {}
    model.segment_loss(tokens, targets, memory)  # the validating first call
    x = model.emb(tokens)
    for i, layer in enumerate(model.layers):
        x_in = x.detach().requires_grad_(True)
        with SavedBytes([*params, x_in, memory]) as saved:
            x = layer(x_in, memory, False)
        out[f"layer{i}"] = saved.total
    x_last = x.detach().requires_grad_(True)
    with SavedBytes([*params, x_last, memory]) as saved:
        model.write(memory, x_last)
    out["write"] = saved.total
    with SavedBytes([*params, x_last, targets]) as saved:
        model._head_loss(x_last, targets)
    out["head_loss"] = saved.total
    for recompute in (False, True):
        with SavedBytes([*params, tokens, targets, memory]) as saved:
            model.segment_loss(tokens, targets, memory, recompute)
        out["segment_recompute" if recompute else "segment"] = saved.total
    with SavedBytes([*params, tokens, targets, memory]) as saved:
        x = model.encode(tokens, memory, True)
        model._head_loss_chunked(True, x, targets)
        model.write(memory, x)
    out["segment_lean"] = saved.total
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print and return the per-block saved bytes (MiB) of one segment."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    for flag, default in (("B", 16), ("L", 128), ("D", 512), ("H", 8), ("K", 1024)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    model = MemformerLM(a.vocab, a.D, a.H, a.layers, a.K).to(dev)
    tokens = torch.randint(0, a.vocab, (a.B, a.L), device=dev)
    targets = torch.randint(0, a.vocab, (a.B, a.L), device=dev)
    memory = model.init_memory(a.B).detach().requires_grad_(True)
    got = segment_bytes(model, tokens, targets, memory)
    for name, n in got.items():
        print(f"{name:<18} {n / MIB:9.1f} MiB", flush=True)
    payload = {"benchmark": "segment_bytes", "record": run_record(), "device": str(dev),
               "sizes": {k: getattr(a, k) for k in ("B", "L", "D", "H", "K", "vocab", "layers")},
               "saved_bytes": got}  # fmt: skip
    write_json(a.out, payload)
    return payload


if __name__ == "__main__":
    main()
