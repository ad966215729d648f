"""`memcore verify` answers bad arguments before any check runs (exit 2, one line), never
reports PASSED having run nothing, names what failed in its last line, prints a replay
command that reproduces a failure, and lists uninstalled backends with their install hint."""

from __future__ import annotations

import io
import pathlib

import pytest

from memcore.cli import main
from memcore.conformance import report
from memcore.conformance.compare import compare
from memcore.conformance.result import CheckResult
from memcore.conformance.tolerances import Tol
from memcore.errors import MemcoreError
from memcore.extras import install_hint
from memcore.registry import get_backend
from memcore.verify_cli import _not_installed

MUTANT = "memcore.conformance.broken:Float32GradientDrift"


def _verify(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["verify", *args])
    io_ = capsys.readouterr()
    return code, io_.out, io_.err


def _bad_file(tmp_path: pathlib.Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _cases(tmp_path: pathlib.Path) -> list[tuple[list[str], str]]:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    return [
        (["--ops", ""], "`--ops` must name at least one op"),
        (["--ops", ","], "`--ops` must name at least one op"),
        (["--ops", " , "], "`--ops` must name at least one op"),
        (["--ops", "memformer", "--no-routing"], "must run at least one check"),
        (["--ops", "bmn,nope"], "Unknown op 'nope'"),
        (["--dtype", "float16"], "every check would be skipped"),
        (["--dtype", "bfloat16"], "every check would be skipped"),
        (["--dtype", "float16,bfloat16"], "every check would be skipped"),
        (["--dtype", ","], "`--dtype` must name at least one dtype"),
        (["--dtype", "float8"], "`--dtype` must be among"),
        (["--cross", "bogus"], "`--cross` must be 'none' or two different verified backends"),
        (["--cross", "numpy"], "`--cross` must be 'none' or two different"),
        (["--cross", "numpy,numpy"], "`--cross` must be 'none' or two different"),
        (["--cross", "numpy,torch"], "(verified: numpy)"),
        (["--cross", "a,b,c"], "`--cross` must be 'none'"),
        (["--json", str(tmp_path / "missing" / "r.json")], "`--json` must be in an existing"),
        (["--json", str(tmp_path)], "`--json` must be a file path"),
        (["--json", str(blocker / "r.json")], "`--json` must be in an existing folder"),
        (["--xfails", _bad_file(tmp_path, "x1.txt", b"bmn # \xff\xfe")], "must be a UTF-8"),
        (["--xfails", _bad_file(tmp_path, "x2.txt", "a # b".encode("utf-16"))], "UTF-8"),
        (["--xfails", _bad_file(tmp_path, "x3.txt", b"no-reason-here\n")], "pattern  # reason"),
        (["--xfails", str(tmp_path / "nope.txt")], "`xfails` must be an existing file"),
        (["--xfails", str(tmp_path)], "`xfails` must be an existing file"),
        (["--seed", "-1"], "`--seed` must be in [0, 2**32)"),
        (["--seed", str(2**32)], "`--seed` must be in [0, 2**32)"),
        (["--device", "cuda:7"], "Device 'cuda:7' is not available"),
    ]


@pytest.mark.parametrize("index", range(26))
def test_bad_arguments_exit_2_before_any_check(tmp_path, capsys, monkeypatch, index):
    """Each bad argument is one stderr line and exit 2, and no check (not even the
    reference self-check) has run."""
    args, fragment = _cases(tmp_path)[index]
    import memcore.conformance.selfcheck as selfcheck

    monkeypatch.setattr(selfcheck, "fd_rows", lambda *a: pytest.fail("a check ran"))
    code, out, err = _verify(capsys, "--backend", "numpy", *args)
    assert code == 2, out + err
    assert err.startswith("memcore verify: error:") and err.count("\n") == 1, err
    assert fragment in err, err
    assert out == ""


def test_json_into_a_missing_folder_leaves_nothing_behind(tmp_path, capsys):
    """The --json check creates no file and no folder."""
    code, _, _ = _verify(capsys, "--backend", "numpy", "--json", str(tmp_path / "m" / "r.json"))
    assert code == 2 and list(tmp_path.iterdir()) == []


def test_a_failure_names_the_backend_and_checks_and_replays(capsys):
    """A 0.1% float32 gradient error fails; the last line names backend, dtype, op and check;
    the printed replay command reproduces the same failure on its own."""
    args = ["--ops", "memory_read", "--no-self-check", "--no-routing", "--dtype", "float32"]
    code, out, _ = _verify(capsys, "--backend", MUTANT, *args)
    last = out.strip().splitlines()[-1]
    assert code == 1
    assert last == f"verify: FAILED ({MUTANT} on cpu: float32 memory_read vjp)"
    fail_note = next(x for x in out.splitlines() if x.startswith("  FAIL  "))
    cell = next(x for x in out.splitlines() if x.startswith("memory_read  vjp"))
    status, figure = cell.split()[-2:]
    noted = float(fail_note.split("max abs err ")[1].split(",")[0])
    assert status == "FAIL" and figure == f"{noted:.1e}"  # the cell and the note agree
    replay = next(x for x in out.splitlines() if x.startswith("  replay "))
    command = replay.split(": ", 1)[1].split()
    assert command[:2] == ["memcore", "verify"] and MUTANT in command
    code2, out2, _ = _verify(capsys, *command[2:])
    assert code2 == 1 and fail_note in out2


def test_a_seed_replays_the_same_examples(capsys):
    """Two dev-profile runs with the same --seed report the same worst error."""
    args = ["--backend", "numpy", "--ops", "bmn", "--no-self-check", "--no-routing"]
    runs = [_verify(capsys, *args, "--profile", "dev", "--seed", "7")[1] for _ in range(2)]
    table = [[x for x in r.splitlines() if x.startswith("bmn ")] for r in runs]
    assert table[0] == table[1] and "seed 7 (replay with --seed 7)" in runs[0]


def test_the_cross_table_names_the_pair():
    """A cross-framework table has a backends column naming the pair of each row."""
    c = compare("grad[x]", [1.0], [1.0], Tol(rtol=1e-3, atol=1e-6))
    rows = [CheckResult("torch~jax-cpu-float32-bmn-cross_vjp", "torch~jax", "cpu", "float32",
                        "bmn", "cross_vjp", "passed", "", 3, c)]
    text = report.format_table(rows)
    assert "backends" in text.splitlines()[1] and "torch vs jax" in text


def test_progress_prints_a_flushed_line_per_unit_when_not_a_terminal():
    """Off a terminal (CI logs), an enabled progress bar writes one full line per unit."""
    stream = io.StringIO()
    bar = report.Progress("jax:cpu", stream, enabled=True)
    unit = type("U", (), {"dtype": "float32", "op": "bmn"})()
    for i in range(3):
        bar(i, 2, unit)
    assert stream.getvalue().count("\n") == 3 and "\r" not in stream.getvalue()


def test_all_lists_uninstalled_backends_with_their_extra(monkeypatch):
    """Under --backend all every registered backend that is not installed is named with its
    pip extra."""
    from memcore import registry

    entries = dict(registry.registered_backends())
    entries["cupy"] = registry.BackendEntry("cupy", "x:y", ("no_such_module_cupy_xyz",))
    monkeypatch.setattr(registry, "registered_backends", lambda: entries)
    lines = _not_installed("all")
    assert "Backend cupy: skipped, not installed (pip install 'memcore[cupy]')" in lines
    assert _not_installed("numpy") == []


@pytest.mark.parametrize(
    ("name", "hint"),
    [("torch", "memcore[torch]"), ("cupy", "memcore[cupy]"), ("array_api", "memcore[array-api]"),
     ("jax", "memcore[jax]"), ("pkg.mod:factory", ""), ("template", ""), ("numpy", "")],
)
def test_install_hints_name_only_our_extras(name, hint):
    """Install hints name memcore's extras for memcore's backends and nothing for others."""
    assert (hint in install_hint(name)) and (bool(hint) == bool(install_hint(name)))


@pytest.mark.parametrize("target", ["pkg.mod:factory", "no_such_pkg_xyz.sub:make", "a:b"])
def test_a_missing_third_party_module_gets_no_memcore_extra(target):
    """`pkg.mod:factory` that cannot be imported does not suggest pip install 'memcore[...]'."""
    with pytest.raises(MemcoreError) as info:
        get_backend(target)
    assert "memcore[" not in str(info.value) and "could not be imported" in str(info.value)


def test_extras_conformance_has_pytest_and_all_leaves_out_cupy():
    """The conformance extra can run `pytest --pyargs memcore.conformance`; [all] has every
    extra installable without CUDA and not cupy."""
    import tomllib

    root = pathlib.Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert any(r.startswith("pytest") for r in extras["conformance"])
    everything = " ".join(extras["all"])
    for name in ("torch", "jax", "triton", "array-api-strict", "hypothesis", "pytest"):
        assert name in everything
    assert "cupy" not in everything
