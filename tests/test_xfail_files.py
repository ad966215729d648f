"""A backend ships its own xfail file: ``xfail_file`` on the backend is read by
``memcore verify`` and the pytest plugin unless ``--xfails`` is given."""

from __future__ import annotations

import pathlib

import pytest

from memcore.cli import main
from memcore.conformance import broken
from memcore.conformance.xfails import backend_xfail_file, bundled_xfail_file
from memcore.errors import MemcoreError
from memcore.registry import get_backend

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARGS = ["--ops", "memory_read", "--dtype", "float32", "--no-routing", "--no-self-check"]


class DeclaredMutant(broken.Float32GradientDrift):
    """A backend with a known float32 gradient deviation, declared in its own xfail file."""

    xfail_file = None  # set by the test to a file in tmp_path

    def __init__(self) -> None:
        super().__init__("memory_read")
        self.name = "declared-mutant"


def make_declared_mutant() -> DeclaredMutant:
    """Factory for `memcore verify --backend test_xfail_files:make_declared_mutant`."""
    return DeclaredMutant()


def test_the_template_declares_its_own_xfail_file():
    """The installed template backend's xfail_file is the file shipped in its package."""
    backend = get_backend("template")
    path = backend_xfail_file(backend)
    assert path == pathlib.Path(backend.xfail_file) and path.is_file()
    assert path.parent.name == "memcore_template"


def test_backends_without_a_declaration_use_the_bundled_file():
    """numpy declares nothing and gets conformance/xfails/numpy.txt."""
    assert backend_xfail_file(get_backend("numpy")) == bundled_xfail_file("numpy")


@pytest.mark.parametrize("declared", [42, "no/such/file.txt", ROOT])
def test_a_bad_declaration_is_a_memcore_error(declared):
    """A declared xfail_file that is not an existing file names the backend."""
    backend = DeclaredMutant()
    backend.xfail_file = declared
    with pytest.raises(MemcoreError, match="`xfail_file` of backend 'declared-mutant'"):
        backend_xfail_file(backend)


def test_verify_reads_the_declared_file_and_xfails_with_its_reason(tmp_path, capsys):
    """The declared file turns the known failure into xfailed (exit 0) with its reason;
    --xfails replaces it (the failure is back)."""
    declared = tmp_path / "declared.txt"
    declared.write_text("float32-memory_read-vjp   # fused float32 kernel, fixed in 0.2\n")
    DeclaredMutant.xfail_file = declared
    try:
        code = main(["verify", "--backend", "test_xfail_files:make_declared_mutant", *ARGS])
        out = capsys.readouterr().out
        assert code == 0 and f"xfails: {declared}" in out
        assert "fused float32 kernel, fixed in 0.2" in out and "xfailed" in out
        other = tmp_path / "other.txt"
        other.write_text("# nothing known\n")
        code = main(["verify", "--backend", "test_xfail_files:make_declared_mutant", *ARGS,
                     "--xfails", str(other)])
        assert code == 1 and "verify: FAILED" in capsys.readouterr().out
    finally:
        DeclaredMutant.xfail_file = None
