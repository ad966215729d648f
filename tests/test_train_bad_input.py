"""memcore train answers bad input with one line and exit 2 before any step runs: generated
bad config values, undecodable config files, unusable output folders, damaged checkpoints,
a resume below the steps done, the backend precedence and a resume on another backend."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pathlib
import tempfile
import zipfile

import numpy as np
import pytest

from memcore.errors import MemcoreError
from memcore.train import parse_config
from memcore.train.cli import main as train_main
from test_train import _tiny, needs_torch

BAD_VALUES = [[], {}, "x", "", 1.5, True, -1, 0, 10**30, float("nan"), float("inf"), [1, "a"]]
MEMFORMER = {
    "task": {"name": "recall", "segments": 2, "items": 2, "vocab": 3},
    "model": {"kind": "memformer", "dim": 4, "slots": 2, "heads": 2},
    "routing": {"method": "mrbp"},
    "optim": {"lr": 0.01},
    "run": {"steps": 2, "batch_size": 2, "eval_size": 4, "eval_batch": 4, "out": "o"},
}


def _cases() -> list[tuple[str, str, str, object]]:
    cases = []
    for label, base in (("sab", _tiny()), ("memformer", MEMFORMER)):
        for section, table in base.items():
            for key in (*table, "name", "kind", "method"):
                cases += [(label, section, key, value) for value in (*BAD_VALUES, None)]
    return cases


@pytest.mark.parametrize(("label", "section", "key", "value"), _cases())
def test_generated_bad_config_values_raise_memcore_error(label, section, key, value):
    """Any value of the wrong type or range in any key is a MemcoreError, never a deep error."""
    data = copy.deepcopy(_tiny() if label == "sab" else MEMFORMER)
    if value is None:
        data[section].pop(key, None)
    else:
        data[section][key] = value
    with contextlib.suppress(MemcoreError):
        parse_config(data)


@pytest.mark.parametrize("section", ["task", "model", "routing", "optim", "run"])
@pytest.mark.parametrize("value", [[], 5, "x", [{}]])
def test_a_section_that_is_not_a_table_is_named(section, value):
    """A section given as a value (not a [table]) is a MemcoreError naming the section."""
    data = _tiny()
    data[section] = value
    with pytest.raises(MemcoreError, match=section):
        parse_config(data)


def _write(path: pathlib.Path, data: dict) -> pathlib.Path:
    lines = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = train_main([*args, "--quiet"])
    io = capsys.readouterr()
    return code, io.out, io.err


def _one_line_usage_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert err.startswith("memcore train: error:") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b'[task]\nname = "copy\xff"\n', "UTF-8"),
        ("[task]\nname = 'copy'\n".encode("utf-16"), "UTF-8"),
        (b"\x80\x81\x82", "UTF-8"),
        (b"[[task]]\nname = 'copy'\n", "`task` must be a [task] table"),
        (b"task = 3\n", "`task` must be a [task] table"),
        (b"[task\n", "valid TOML"),
    ],
)
def test_config_files_that_cannot_be_read(tmp_path, capsys, raw, fragment):
    """Undecodable or invalid config files are one-line exit-2 errors."""
    path = tmp_path / "c.toml"
    path.write_bytes(raw)
    code, _, err = _run(capsys, str(path), "--out", str(tmp_path / "out"))
    _one_line_usage_error(code, err, fragment)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("run.out", 5, "`out` must be a non-empty folder path"),
        ("run.out", "", "`out` must be a non-empty folder path"),
        ("run.out", [], "`out` must be a non-empty folder path"),
        ("task.name", [], "`task.name` must be one of"),
        ("task.name", 3, "`task.name` must be one of"),
        ("model.kind", ["sab"], "`model.kind` must be one of"),
        ("routing.method", [], "`method` must be one of"),
        ("run.steps", "10", "`steps` must be an integer"),
    ],
)
def test_config_values_of_the_wrong_type(tmp_path, capsys, key, value, fragment):
    """Mistyped values in a config file are one-line exit-2 errors naming the key."""
    path = _write(tmp_path / "c.toml", _tiny(**{key: value}))
    code, _, err = _run(capsys, str(path), "--out", str(tmp_path / "out"))
    _one_line_usage_error(code, err, fragment)


def test_config_that_is_a_folder(tmp_path, capsys):
    """A folder given as the config is a one-line exit-2 error."""
    code, _, err = _run(capsys, str(tmp_path), "--out", str(tmp_path / "out"))
    _one_line_usage_error(code, err, "`config` must be an existing TOML file")


@pytest.mark.parametrize("where", ["file", "under_file", "under_file_deep"])
def test_out_that_is_a_file_or_under_one(tmp_path, capsys, where):
    """--out naming a file, or a path below a file, fails before training."""
    cfg = _write(tmp_path / "c.toml", _tiny())
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    out = {"file": blocker, "under_file": blocker / "o", "under_file_deep": blocker / "a" / "b"}
    code, _, err = _run(capsys, str(cfg), "--out", str(out[where]))
    _one_line_usage_error(code, err, "`--out` must be a folder memcore train can write")
    assert blocker.read_text() == "not a folder"


def test_out_that_cannot_be_written_fails_before_training(tmp_path, capsys, monkeypatch):
    """A folder where no file can be created fails before the first step (write probe)."""
    import memcore.train.checkpoint as checkpoint

    steps = []
    monkeypatch.setattr(
        "memcore.train.trainer._step", lambda *a: steps.append(1) or pytest.fail("trained")
    )

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", refuse)
    cfg = _write(tmp_path / "c.toml", _tiny())
    code, _, err = _run(capsys, str(cfg), "--out", str(tmp_path / "ro"))
    _one_line_usage_error(code, err, "`--out` must be a folder", "Permission denied")
    assert steps == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_out_fails_before_training(tmp_path, capsys):
    """A read-only --out folder fails before the first step, not at the first checkpoint."""
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        cfg = _write(tmp_path / "c.toml", _tiny())
        code, _, err = _run(capsys, str(cfg), "--out", str(out))
        _one_line_usage_error(code, err, "`--out` must be a folder")
    finally:
        out.chmod(0o755)


def _saved_run(tmp_path: pathlib.Path, capsys, **over) -> tuple[pathlib.Path, pathlib.Path]:
    cfg = _write(tmp_path / "c.toml", _tiny(**over))
    out = tmp_path / "out"
    code, _, err = _run(capsys, str(cfg), "--out", str(out), "--stop-after", "3")
    assert code == 0, err
    return cfg, out


def _damage(kind: str, path: pathlib.Path) -> None:
    good = path.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind.startswith("truncated"):
        path.write_bytes(good[: int(len(good) * float(kind.split("_")[1]))])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(len(good)))
    elif kind == "flipped":
        raw = bytearray(good)
        for i in range(200, len(raw), 97):
            raw[i] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif kind == "text":
        path.write_text("hello")
    else:  # rewrite one entry of a valid archive
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        if kind == "no_step":
            del arrays["step"]
        elif kind == "bad_json":
            arrays["history"] = np.asarray("{not json")
        elif kind == "bad_shape":
            arrays["param/lstm_w"] = np.zeros((2, 2))
        elif kind == "short_history":
            arrays["step"] = np.asarray(5)
        elif kind == "missing_moment":
            del arrays["adam_m/lstm_w"]
        elif kind == "bad_config":
            arrays["config"] = np.asarray(json.dumps({"task": 3}))
        elif kind == "object_array":
            with zipfile.ZipFile(path, "w") as z:
                z.writestr("step.npy", b"\x93NUMPY garbage")
            return
        np.savez(path, **arrays)


DAMAGE = [
    "empty",
    "truncated_0.1",
    "truncated_0.5",
    "truncated_0.99",
    "random",
    "flipped",
    "text",
    "no_step",
    "bad_json",
    "bad_shape",
    "short_history",
    "missing_moment",
    "bad_config",
    "object_array",
]


@pytest.mark.parametrize("kind", DAMAGE)
def test_resume_from_a_damaged_checkpoint(tmp_path, capsys, kind):
    """An empty, truncated, corrupted or inconsistent checkpoint.npz is a one-line exit-2
    error that leaves the file as it was."""
    cfg, out = _saved_run(tmp_path, capsys)
    _damage(kind, out / "checkpoint.npz")
    before = (out / "checkpoint.npz").read_bytes()
    code, _, err = _run(capsys, str(cfg), "--out", str(out), "--resume")
    _one_line_usage_error(code, err, "`--resume` checkpoint")
    assert (out / "checkpoint.npz").read_bytes() == before


@pytest.mark.parametrize("steps", [1, 2])
def test_resume_with_fewer_steps_than_done_is_refused(tmp_path, capsys, steps):
    """run.steps below the checkpoint's steps exits 2 and writes no finished results."""
    cfg, out = _saved_run(tmp_path, capsys)
    before = (out / "results.json").read_text()
    _write(cfg, _tiny(**{"run.steps": steps}))
    code, _, err = _run(capsys, str(cfg), "--out", str(out), "--resume")
    _one_line_usage_error(code, err, "`run.steps` must be >= the 3 steps", f"steps={steps}")
    assert (out / "results.json").read_text() == before


def test_resume_with_exactly_the_steps_done_writes_the_results(tmp_path, capsys):
    """run.steps equal to the steps done finishes the run without another step."""
    cfg, out = _saved_run(tmp_path, capsys)
    _write(cfg, _tiny(**{"run.steps": 3}))
    code, text, err = _run(capsys, str(cfg), "--out", str(out), "--resume")
    assert code == 0 and "finished at step 3/3" in text, err
    assert json.loads((out / "results.json").read_text())["finished"] is True


@needs_torch
def test_memcore_backend_env_and_memcore_toml_choose_the_backend(tmp_path, capsys, monkeypatch):
    """Without --backend, MEMCORE_BACKEND wins over ./memcore.toml, which wins over numpy."""
    cfg = _write(tmp_path / "c.toml", _tiny())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "memcore.toml").write_text('backend = "from_toml"\n')
    monkeypatch.delenv("MEMCORE_BACKEND", raising=False)
    code, _, err = _run(capsys, str(cfg), "--out", "o1")
    _one_line_usage_error(code, err, "Unknown backend 'from_toml'")
    monkeypatch.setenv("MEMCORE_BACKEND", "from_env")
    code, _, err = _run(capsys, str(cfg), "--out", "o2")
    _one_line_usage_error(code, err, "Unknown backend 'from_env'")
    monkeypatch.setenv("MEMCORE_BACKEND", "torch")
    code, text, err = _run(capsys, str(cfg), "--out", "o3", "--stop-after", "1")
    assert code == 0 and "on torch" in text, err
    code, _, err = _run(capsys, str(cfg), "--out", "o3", "--resume", "--backend", "numpy")
    _one_line_usage_error(code, err, "`--backend` must be 'torch'", "--switch-backend")


@needs_torch
def test_an_explicit_backend_switch_is_recorded(tmp_path, capsys):
    """--switch-backend continues on another backend and results.json records both."""
    cfg = _write(tmp_path / "c.toml", _tiny())
    out = str(tmp_path / "o")
    assert _run(capsys, str(cfg), "--out", out, "--backend", "numpy", "--stop-after", "2")[0] == 0
    args = (str(cfg), "--out", out, "--backend", "torch", "--resume", "--switch-backend")
    code, text, err = _run(capsys, *args)
    assert code == 0 and "on torch" in text, err
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["backend"] == "torch"
    assert results["backends"] == [[0, "numpy"], [2, "torch"]]


def test_no_temporary_files_are_left_behind(tmp_path, capsys):
    """A run leaves only its checkpoint, results and plot in --out (no probe or temp files)."""
    _cfg, out = _saved_run(tmp_path, capsys)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.npz", "curves.png", "results.json"]
    assert not list(pathlib.Path(tempfile.gettempdir()).glob(".memcore-write-probe-*"))
