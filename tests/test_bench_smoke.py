"""CPU smoke tests of the issue-7 benchmark code paths at tiny sizes (the numbers come from a GPU)."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

torch = pytest.importorskip("torch", reason="the benchmarks are torch code")

# bench/ is a folder of scripts at the repository root, not an installed package: make it
# importable however pytest was started (``pytest`` alone does not put the root on sys.path).
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench import mrbp_lm, read_sdpa, sab_replay, scaling
from bench.harness import median_time, rel_error
from bench.lm_model import MemformerLM
from bench.lm_routing import METHODS
from bench.write_kernel import counts
from memcore.config import SABConfig

TINY_LM = [
    "--B",
    "2",
    "--L",
    "8",
    "--D",
    "32",
    "--H",
    "4",
    "--K",
    "6",
    "--vocab",
    "40",
    "--layers",
    "1",
    "--precision",
    "fp32",
    "--repeat",
    "1",
    "--warmup",
    "0",
]


def _grads(model, tokens, targets, name):
    model.zero_grad(set_to_none=True)
    METHODS[name](model, tokens, targets)
    return [p.grad.clone() for p in model.parameters()]


def test_lm_mrbp_and_checkpoint_match_bptt_gradients():
    """MRBP and per-segment checkpointing give BPTT's gradient on the LM, every parameter."""
    torch.manual_seed(0)
    model = MemformerLM(vocab=30, dim=32, heads=4, layers=2, slots=5).double()
    tokens = torch.randint(0, 30, (3, 2, 6))
    targets = torch.randint(0, 30, (3, 2, 6))
    ref = _grads(model, tokens, targets, "bptt")
    assert all(g.abs().sum() > 0 for g in ref[:1])
    for name in ("mrbp", "checkpoint"):
        assert rel_error(_grads(model, tokens, targets, name), ref) < 1e-10, name


@pytest.mark.parametrize(
    "opts",
    [
        {"recompute": "layers"},
        {"stash": "host"},
        {"stash": "host", "recompute": "lean"},
        {"stash": "host", "recompute": "keep"},
    ],
)
def test_lm_mrbp_options_keep_the_bptt_gradient(opts):
    """Offloading the memories and recomputing blocks inside a segment (the library's MRBP
    on the LM) change no gradient."""
    torch.manual_seed(2)
    model = MemformerLM(vocab=30, dim=32, heads=4, layers=2, slots=5).double()
    tokens, targets = torch.randint(0, 30, (3, 2, 6)), torch.randint(0, 30, (3, 2, 6))
    ref = _grads(model, tokens, targets, "bptt")
    model.zero_grad(set_to_none=True)
    METHODS["mrbp"](model, tokens, targets, **opts)
    got = [p.grad.clone() for p in model.parameters()]
    assert rel_error(got, ref) < 1e-10


def test_lm_recompute_saves_less_for_backward():
    """With recompute, the replayed segment saves only block inputs: far fewer bytes."""
    from memcore.backends.torch.accounting import SavedBytes

    torch.manual_seed(3)
    model = MemformerLM(vocab=30, dim=32, heads=4, layers=3, slots=16)
    tokens, targets = torch.randint(0, 30, (2, 8)), torch.randint(0, 30, (2, 8))
    M = model.init_memory(2).detach()
    model.segment_loss(tokens, targets, M)  # the validating first call
    saved = {}
    for recompute in (False, True):
        with SavedBytes(list(model.parameters()) + [tokens, targets, M]) as counter:
            model.segment_loss(tokens, targets, M.requires_grad_(True), recompute)
        saved[recompute] = counter.total
    assert saved[True] * 4 < saved[False], saved


@pytest.mark.parametrize(
    "name, base, opts",
    [
        ("mrbp", "mrbp", {}),
        ("mrbp+host", "mrbp", {"stash": "host"}),
        ("mrbp_graph+host+layers", "mrbp_graph", {"stash": "host", "recompute": "layers"}),
        ("mrbp_graph+host+lean", "mrbp_graph", {"stash": "host", "recompute": "lean"}),
    ],
)
def test_parse_method(name, base, opts):
    """Method names map to the library MRBP's options."""
    assert mrbp_lm.parse_method(name) == (base, opts)


@pytest.mark.parametrize(
    "name", ["mrbp+disk", "bptt+host", "mrbpp", "checkpoint+layers", "mrbp+layers+lean"]
)
def test_parse_method_rejects_unknown_names(name):
    """Unknown methods, unknown options and clashing recompute options are rejected."""
    with pytest.raises(ValueError, match="unknown"):
        mrbp_lm.parse_method(name)


def test_lm_mrbp_differs_when_the_memory_cotangent_is_dropped():
    """The equivalence check can fail: truncating dM between segments changes the gradient."""
    torch.manual_seed(1)
    model = MemformerLM(vocab=30, dim=32, heads=4, layers=1, slots=5).double()
    tokens, targets = torch.randint(0, 30, (3, 2, 6)), torch.randint(0, 30, (3, 2, 6))
    ref = _grads(model, tokens, targets, "bptt")
    model.zero_grad(set_to_none=True)
    for t in range(3):  # each segment from a detached memory: no gradient through M
        M = model.init_memory(2)
        for s in range(t):
            M = model.advance(tokens[s], M).detach()
        (model.segment_loss(tokens[t], targets[t], M)[0] / 3).backward()
    got = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
    assert rel_error(got, ref) > 1e-6


def test_mrbp_lm_main_writes_rows(tmp_path):
    """The LM benchmark runs end to end on the CPU and records every method with its ratios."""
    out = tmp_path / "lm.json"
    payload = mrbp_lm.main(
        TINY_LM + ["--T", "2", "--methods", "bptt,checkpoint,mrbp,mrbp+host+layers,mrbp_graph"]
        + ["--out", str(out)]
    )
    rows = json.loads(out.read_text())["rows"]
    # mrbp_graph needs CUDA: left out on the CPU, and said so in the method list
    assert [r["method"] for r in rows] == ["bptt", "checkpoint", "mrbp", "mrbp+host+layers"]
    assert all(r["median_s"] > 0 and r["grad_rel_err_vs_bptt"] < 1e-4 for r in rows)
    assert payload["exact_check"]["rel_err_vs_bptt"]["mrbp"] < 1e-4
    assert payload["record"]["torch"] == torch.__version__


def test_random_batch_targets_are_next_tokens():
    """Targets are the token stream shifted by one, and the data is not all zeros."""
    args = mrbp_lm.parser().parse_args(TINY_LM)
    tokens, targets = mrbp_lm.random_batch(3, args, torch.device("cpu"))
    assert tokens.shape == (3, 2, 8) and tokens.any()
    assert torch.equal(tokens[:, :, 1:], targets[:, :, :-1])
    assert torch.equal(tokens[1:, :, 0], targets[:-1, :, -1])


def test_sab_replay_main_checks_and_times(tmp_path):
    """The SAB benchmark checks replay against sab_bptt, then times all four methods."""
    out = tmp_path / "sab.json"
    payload = sab_replay.main(
        [
            "--B",
            "3",
            "--Hd",
            "8",
            "--A",
            "4",
            "--T",
            "20",
            "--check-T",
            "25",
            "--repeat",
            "1",
            "--warmup-T",
            "10",
            "--out",
            str(out),
        ]
    )
    assert payload["check"]["rel_err_replay_vs_sab_bptt"] < 1e-4
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == {"bptt", "sab_bptt", "sparse_replay", "dense_bptt"}
    assert all(r["median_s"] > 0 for r in rows)


def test_stored_bytes_counts_memories_and_boundaries():
    """Replay's stored state: T / k_att memory vectors plus (h, c) at each of ceil(T / k_trunc)."""
    cfg = SABConfig(k_att=10, k_trunc=10)
    assert sab_replay.stored_bytes(1000, 64, 128, cfg) == (100 + 200) * 64 * 128 * 4
    assert sab_replay.stored_bytes(25, 2, 4, SABConfig(k_att=5, k_trunc=10)) == (5 + 6) * 2 * 4 * 4


def test_read_sdpa_variants_agree():
    """SDPA and the batched-matmul read agree in output and gradient on the CPU."""
    payload = read_sdpa.main(
        [
            "--B",
            "2",
            "--K",
            "5",
            "--L",
            "4",
            "--D",
            "16",
            "--H",
            "2",
            "--dtype",
            "float32",
            "--repeat",
            "1",
        ]
    )
    ok = [r for r in payload["rows"] if "error" not in r]
    assert {"matmul", "sdpa"} <= {r["variant"] for r in ok}
    assert all(r["out_rel_err"] < 1e-5 and r["grad_rel_err"] < 1e-5 for r in ok)


def test_scaling_sweeps_both_axes(tmp_path):
    """The scaling sweep records points against T and against K (no plot without matplotlib)."""
    payload = scaling.main(
        TINY_LM
        + ["--T", "1,2", "--K-list", "3,6", "--T-for-K", "1", "--out", str(tmp_path / "s.json")]
    )
    assert {(r["method"], r["T"]) for r in payload["rows_T"]} >= {("bptt", 2), ("mrbp", 2)}
    assert sorted({r["K"] for r in payload["rows_K"]}) == [3, 6]


def test_write_counts_match_hand_count():
    """FLOP count of the write: projections 4BKD^2 + 4BLD^2, attention 4BKLD (forward)."""
    c = counts(B=2, K=3, L=5, D=8, itemsize=4)
    assert c["fwd_flops"] == 4 * 2 * 3 * 64 + 4 * 2 * 5 * 64 + 4 * 2 * 3 * 5 * 8
    assert c["fwd_bwd_bytes"] > c["fwd_bytes"] > 0


def test_median_time_reports_the_median():
    """median_time returns the median of the timed calls, after the warm-up calls."""
    calls = []
    res = median_time(lambda: calls.append(1), repeat=5, warmup=2)
    assert len(calls) == 7 and len(res["samples_s"]) == 5
    assert res["min_s"] <= res["median_s"] <= res["max_s"]


def test_fit_memory_brackets_the_largest_T(monkeypatch):
    """The fit search ends with T fitting and T * 1.05 out of memory, against a memory model
    whose slope at large T is below the one the table's small T suggest."""
    gib = 2**30
    peak = lambda T: int((1.0 + 0.035 * T) * gib)  # 40 GiB -> largest T = 1114
    calls = []

    def fake_run(name, model, args, device, T, repeat):
        calls.append(T)
        if peak(T) > 40 * gib:
            return {"oom": True}
        return {"median_s": 1.0, "peak_reserved": peak(T), "peak_allocated": peak(T),
                "tokens_per_s": float(T), "samples_s": [1.0]}  # fmt: skip

    monkeypatch.setattr(mrbp_lm, "_fit_run", fake_run)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f: None)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": 140 * gib})
    )
    monkeypatch.setattr(mrbp_lm, "cuda", lambda: True)
    args = mrbp_lm.parser().parse_args(TINY_LM + ["--methods", "mrbp"])
    rows = [  # the small-T slope (0.045 GiB/segment) overestimates the large-T one
        {"method": "mrbp", "precision": "fp32", "T": 8, "footprint_bytes": int(1.0 * gib)},
        {"method": "mrbp", "precision": "fp32", "T": 32, "footprint_bytes": int(2.08 * gib)},
    ]
    (row,) = mrbp_lm.fit_memory(None, args, None, rows, 40)
    assert row["bracketed"] and peak(row["T"]) <= 40 * gib < peak(row["oom_T"])
    assert row["oom_T"] <= -(-row["T"] * 105 // 100)
    assert len(calls) <= args.fit_rounds + 1 and row["tokens_per_s"] == float(row["T"])


def test_segment_bytes_blocks_add_up(tmp_path):
    """The segment's saved bytes are its blocks' (up to shared storages), and recompute
    keeps far fewer."""
    from bench import segment_bytes

    sizes = ["--B", "2", "--L", "8", "--D", "32", "--H", "4", "--K", "16", "--vocab", "40", "--layers", "2", "--device", "cpu"]
    payload = segment_bytes.main([*sizes, "--out", str(tmp_path / "seg.json")])
    got = payload["saved_bytes"]
    blocks = got["layer0"] + got["layer1"] + got["write"] + got["head_loss"]
    assert 0.8 * blocks <= got["segment"] <= 1.2 * blocks
    assert got["segment_recompute"] * 3 < got["segment"]
    # lean keeps the write's saved tensors on top of the recomputed segment's block inputs
    assert got["segment_recompute"] < got["segment_lean"] < got["segment"]
    assert json.loads((tmp_path / "seg.json").read_text())["saved_bytes"] == got
