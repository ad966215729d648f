"""The lazy backend registry: precedence, unknown names, nesting, third-party backends,
and that importing memcore (and using the numpy backend) imports no framework.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap

import pytest

import memcore
from memcore import MemcoreError, registry
from memcore.backends.numpy import NumpyBackend

FAKE = "memcore_fake_backend_for_tests"
FACTORIES = ("explicit", "context", "outer", "inner", "env", "toml", "pyproject", "entry")


@pytest.fixture
def clean(monkeypatch, tmp_path):
    """Empty cwd, no MEMCORE_BACKEND, a fresh instance cache and a fake third-party backend."""
    monkeypatch.setattr(registry, "_instances", {})
    monkeypatch.delenv("MEMCORE_BACKEND", raising=False)
    site = tmp_path / "site"
    site.mkdir()
    body = "class Fake:\n    def __init__(self, label):\n        self.name = label\n\n"
    body += "".join(f"def make_{n}():\n    return Fake({n!r})\n\n" for n in FACTORIES)
    (site / f"{FAKE}.py").write_text(body)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, FAKE, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def _t(label: str) -> str:
    return f"{FAKE}:make_{label}"


def test_precedence_order(clean, monkeypatch):
    """explicit > use_backend > MEMCORE_BACKEND > memcore.toml > [tool.memcore] > numpy."""
    (clean / "pyproject.toml").write_text(
        f'[project]\nname = "x"\n[tool.memcore]\nbackend = "{_t("pyproject")}"\n'
    )
    (clean / "memcore.toml").write_text(f'backend = "{_t("toml")}"\n')
    monkeypatch.setenv("MEMCORE_BACKEND", _t("env"))
    with memcore.use_backend(_t("context")) as chosen:
        assert chosen.name == "context"
        assert memcore.get_backend(_t("explicit")).name == "explicit"
        assert memcore.get_backend().name == "context"
    assert memcore.get_backend().name == "env"
    monkeypatch.delenv("MEMCORE_BACKEND")
    assert memcore.get_backend().name == "toml"
    (clean / "memcore.toml").unlink()
    assert memcore.get_backend().name == "pyproject"
    (clean / "pyproject.toml").unlink()
    assert isinstance(memcore.get_backend(), NumpyBackend)
    assert registry.resolve_backend_name() == "numpy"


def test_empty_env_var_is_unset(clean, monkeypatch):
    """MEMCORE_BACKEND="" does not count as a choice."""
    monkeypatch.setenv("MEMCORE_BACKEND", "")
    assert registry.resolve_backend_name() == "numpy"


def test_memcore_toml_without_backend_defers_to_pyproject(clean):
    """A memcore.toml with no backend key is no match; pyproject's [tool.memcore] is used."""
    (clean / "memcore.toml").write_text("# nothing chosen here\n[other]\nx = 1\n")
    (clean / "pyproject.toml").write_text(f'[tool.memcore]\nbackend = "{_t("pyproject")}"\n')
    assert memcore.get_backend().name == "pyproject"
    (clean / "pyproject.toml").write_text('[tool.other]\nbackend = "jax"\n')
    assert registry.resolve_backend_name() == "numpy"


@pytest.mark.parametrize(
    "text, match",
    [
        (
            "backend = 3\n",
            r"`backend` in .*memcore.toml must be a non-empty string. Received: backend=3",
        ),
        ("backend = [\n", r"memcore.toml` must be valid TOML"),
    ],
)
def test_bad_config_file(clean, text, match):
    """A malformed memcore.toml raises MemcoreError naming the file."""
    (clean / "memcore.toml").write_text(text)
    with pytest.raises(MemcoreError, match=match):
        memcore.get_backend()


def test_unknown_name_lists_available(clean, monkeypatch):
    """An unknown name, from any source, lists the available backends."""
    available = ", ".join(memcore.available_backends())
    assert "numpy" in memcore.available_backends()
    msg = f"Unknown backend 'toch'. Available: {available}"
    with pytest.raises(MemcoreError, match="^" + msg.replace(".", r"\.") + "$"):
        memcore.get_backend("toch")
    with pytest.raises(MemcoreError, match="Unknown backend 'toch'"), memcore.use_backend("toch"):
        pass  # pragma: no cover
    monkeypatch.setenv("MEMCORE_BACKEND", "nunpy")
    with pytest.raises(MemcoreError, match=r"Unknown backend 'nunpy'. Available: "):
        memcore.get_backend()


def test_nested_use_backend_restores(clean):
    """The innermost use_backend wins; leaving a block (even by an exception) restores the outer."""
    with memcore.use_backend(_t("outer")):
        with memcore.use_backend(_t("inner")):
            assert memcore.get_backend().name == "inner"
        assert memcore.get_backend().name == "outer"
        with pytest.raises(RuntimeError), memcore.use_backend(_t("inner")):
            raise RuntimeError("boom")
        assert registry.resolve_backend_name() == _t("outer")
    assert registry.resolve_backend_name() == "numpy"


def test_third_party_factory_names(clean):
    """'pkg.module:factory' loads the factory once and caches the instance under that name."""
    first = memcore.get_backend(_t("explicit"))
    assert first.name == "explicit" and memcore.get_backend(_t("explicit")) is first
    with pytest.raises(
        MemcoreError, match=r"`backend` factory 'make_nothing' must exist in module"
    ):
        memcore.get_backend(f"{FAKE}:make_nothing")
    with pytest.raises(
        MemcoreError, match=r"Backend 'no_such_pkg_xyz.mod:f' could not be imported"
    ):
        memcore.get_backend("no_such_pkg_xyz.mod:f")
    with pytest.raises(MemcoreError, match=r"registered name or 'package.module:factory'"):
        memcore.get_backend(f"{FAKE}:")


def test_entry_point_backends_are_registered(clean, monkeypatch):
    """A memcore.backends entry point is listed by name and loads through its factory."""
    real = importlib.metadata.entry_points

    def entry_points(**kw):
        if kw.get("group") == registry.ENTRY_POINT_GROUP:
            return [
                importlib.metadata.EntryPoint("fakebk", _t("entry"), registry.ENTRY_POINT_GROUP)
            ]
        return real(**kw)

    monkeypatch.setattr(registry.importlib.metadata, "entry_points", entry_points)
    assert registry.registered_backends()["fakebk"].requires == (FAKE,)
    assert "fakebk" in memcore.available_backends()
    assert memcore.get_backend("fakebk").name == "entry"


def test_numpy_backend_is_the_reference_singleton(clean):
    """get_backend('numpy') is one cached NumpyBackend instance."""
    b = memcore.get_backend("numpy")
    assert isinstance(b, NumpyBackend) and memcore.get_backend() is b and b.name == "numpy"


def test_import_memcore_imports_no_framework(tmp_path):
    """Fresh interpreter: memcore, its reference and numpy backend import no torch, jax, cupy."""
    script = textwrap.dedent(
        """
        import json, sys
        import memcore
        import memcore.reference
        memcore.get_backend("numpy")
        memcore.available_backends()
        memcore.registered_backends()
        print(json.dumps(sorted(m for m in ("torch", "jax", "jaxlib", "cupy") if m in sys.modules)))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "MEMCORE_BACKEND"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
