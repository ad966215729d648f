"""CPU smoke test of bench/sab_speed.py at tiny sizes (the numbers that matter come from a GPU)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

pytest.importorskip("torch", reason="the benchmark is torch code")

_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench import sab_speed

TINY = ["--device", "cpu", "--T", "4", "--batch", "3", "--hidden", "6", "--steps", "1",
        "--warmup", "1", "--transfer-T", "12", "--transfer-n", "4"]  # fmt: skip


def test_sab_speed_runs_every_row_on_cpu(tmp_path):
    """Every row runs at tiny sizes, the JSON holds steps/s, the ratios and the eval time."""
    out = tmp_path / "speed.json"
    payload = sab_speed.main([*TINY, "--out", str(out)])
    rows = payload["rows"]
    for name in ("lstmcell_graph", "cudnn_lstm", "memcore_sab", "memcore_sab_whole",
                 "memcore_lstm_bptt"):  # fmt: skip
        assert rows[name].get("steps_per_s", 0) > 0, (name, rows[name])
    assert rows["transfer_eval"]["T"] == 12 and rows["transfer_eval"]["seconds"] > 0
    assert 0.0 <= rows["transfer_eval"]["accuracy"] <= 1.0
    goals = payload["goals"]
    assert goals["sab_vs_lstmcell_graph"]["ratio"] > 0 and goals["lstm_bptt_vs_cudnn"]["ratio"] > 0
    assert json.loads(out.read_text())["goals"]["transfer_eval_s"]["seconds"] > 0


@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None
    or importlib.util.find_spec("memcore.backends.jax.sab_model") is None,
    reason="needs jax and memcore.backends.jax.sab_model",
)
def test_sab_speed_jax_rows_on_cpu():
    """--backend jax times the JAX compiled training step (memcore.train.fast_jax)."""
    payload = sab_speed.main([*TINY, "--backend", "jax", "--rows", "memcore_sab"])
    assert payload["rows"]["memcore_sab"].get("steps_per_s", 0) > 0, payload["rows"]
