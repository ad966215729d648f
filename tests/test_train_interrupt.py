"""An interrupted or failing `memcore train` loses nothing: Ctrl-C checkpoints the last
finished step and exits 130 with one line saying how to continue, a failing checkpoint write
leaves the previous checkpoint whole, and the resumed run equals the uninterrupted one."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

import memcore.train.trainer as trainer
from memcore.train import parse_config, train
from memcore.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from memcore.train.cli import main as train_main
from test_train import _tiny

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _write(path: pathlib.Path, data: dict) -> pathlib.Path:
    lines = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _arrays(path: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files if k.startswith(("param/", "adam_"))}


def _interrupt_at(monkeypatch, target: str, call: int) -> None:
    """Raise KeyboardInterrupt on the ``call``-th call (1-based) of ``trainer.<target>``."""
    real, count = getattr(trainer, target), [0]

    def wrapped(*args, **kwargs):
        count[0] += 1
        if count[0] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, target, wrapped)


# (function interrupted, which call, steps the checkpoint must then hold); the tiny run has
# 6 steps, checkpoint_every 3, log_every 2, eval_every 2.
POINTS = [
    ("routed_gradient", 1, None),  # before any step finished: nothing to save
    ("routed_gradient", 2, 1),
    ("routed_gradient", 5, 4),
    ("adam_update", 3, 2),
    ("batch_metrics", 2, 3),  # step 4's logging: steps 1-3 are done
    ("evaluate", 1, 1),  # eval after step 2 runs after its update: step 2 is not yet returned
    ("_save", 1, 3),  # the periodic save at step 3 is interrupted: saved again at 3
    ("_results", 1, 6),  # after the last step, while writing the results
]


@pytest.mark.parametrize(("target", "call", "saved"), POINTS)
def test_interrupt_checkpoints_the_last_finished_step(
    tmp_path, capsys, monkeypatch, target, call, saved
):
    """Ctrl-C anywhere in a run exits 130 with one line; the checkpoint holds the last finished
    step with a matching history, and --resume then equals the uninterrupted run."""
    cfg = _write(tmp_path / "c.toml", _tiny(**{"run.eval_every": 2}))
    whole = train(parse_config(_tiny(**{"run.eval_every": 2})), out=str(tmp_path / "whole"))
    out = tmp_path / "out"
    _interrupt_at(monkeypatch, target, call)
    code = train_main([str(cfg), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 130 and err.count("\n") == 1 and err.startswith("memcore train:"), err
    if saved is None:
        assert "nothing was saved" in err and not (out / "checkpoint.npz").exists()
        return
    assert f"step {saved} is saved in" in err and "--resume" in err, err
    ckpt = load_checkpoint(out / "checkpoint.npz")
    assert ckpt.step == saved and ckpt.history["step"] == list(range(1, saved + 1))
    assert all(r["step"] <= saved for r in ckpt.history["train"] + ckpt.history["eval"])
    monkeypatch.undo()
    command = err.split("Continue with: ")[1].split()
    assert command[:2] == ["memcore", "train"] and command[-1] == "--resume"
    assert train_main(command[2:]) == 0
    rest = json.loads((out / "results.json").read_text())
    assert rest["history"]["loss"] == whole["history"]["loss"]
    assert rest["history"]["train"] == whole["history"]["train"]
    assert rest["history"]["eval"] == whole["history"]["eval"]
    want, got = _arrays(tmp_path / "whole" / "checkpoint.npz"), _arrays(out / "checkpoint.npz")
    assert want.keys() == got.keys()
    assert all(np.array_equal(want[k], got[k]) for k in want)


def _ckpt(step: int) -> Checkpoint:
    w = np.full((2, 2), float(step))
    return Checkpoint(step, {"w": w}, step, {"w": w}, {"w": w}, {}, {"step": list(range(step))})


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError, MemoryError])
def test_a_failing_checkpoint_write_keeps_the_old_checkpoint(tmp_path, monkeypatch, error):
    """An interrupt or an error inside the write leaves the previous file whole and no
    temporary file behind."""
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, _ckpt(1))
    before = path.read_bytes()

    def half_write(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise error

    monkeypatch.setattr(np, "savez", half_write)
    with pytest.raises(error):
        save_checkpoint(path, _ckpt(2))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]
    monkeypatch.undo()
    assert load_checkpoint(path).step == 1


def test_sigint_to_a_running_process_then_resume_equals_an_uninterrupted_run(tmp_path):
    """A real SIGINT to `python -m memcore train` after its first steps exits 130 with a
    checkpoint; --resume up to N steps gives the parameters of an uninterrupted N-step run."""
    long = _tiny(**{"run.steps": 100_000, "run.log_every": 1, "run.checkpoint_every": 0})
    cfg = _write(tmp_path / "c.toml", long)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "memcore", "train", str(cfg), "--out", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        for line in proc.stderr:  # one progress line per step (log_every 1, not a terminal)
            if line.startswith("step 3/"):  # so step 2 has surely returned
                break
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    last = [x for x in rest.splitlines() if x.strip()][-1]
    assert code == 130 and "Continue with:" in last and "Traceback" not in rest, rest
    done = load_checkpoint(out / "checkpoint.npz").step
    assert done >= 2
    steps = done + 2
    _write(cfg, {**long, "run": {**long["run"], "steps": steps}})
    finish = subprocess.run([*cmd, "--resume", "--quiet"], capture_output=True, text=True, env=env)
    assert finish.returncode == 0, finish.stderr
    ref = parse_config({**long, "run": {**long["run"], "steps": steps}})
    whole = train(ref, out=str(tmp_path / "whole"))
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["history"]["loss"] == whole["history"]["loss"]
    want, got = _arrays(tmp_path / "whole" / "checkpoint.npz"), _arrays(out / "checkpoint.npz")
    assert all(np.array_equal(want[k], got[k]) for k in want)
