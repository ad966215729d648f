"""Backend discovery: ours register through the ``memcore.backends`` entry points exactly as
the built-in fallback table says, entry points take precedence, and ``describe_backends``
reports availability, version and devices without importing any framework."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import tomllib

from memcore import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]
DECLARED = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][
    registry.ENTRY_POINT_GROUP
]
FRAMEWORKS = ("torch", "jax", "jaxlib", "cupy", "array_api_strict", "memcore_template")


def _with_entry_points(monkeypatch, points):
    real = importlib.metadata.entry_points

    def entry_points(**kw):
        if kw.get("group") == registry.ENTRY_POINT_GROUP:
            return [
                importlib.metadata.EntryPoint(n, v, registry.ENTRY_POINT_GROUP) for n, v in points
            ]
        return real(**kw)

    monkeypatch.setattr(registry.importlib.metadata, "entry_points", entry_points)


def test_pyproject_entry_points_equal_the_builtin_table():
    """pyproject's memcore.backends table and registry._BUILTIN name the same targets."""
    assert {e.name: e.target for e in registry._BUILTIN} == DECLARED
    assert set(DECLARED) == {"numpy", "torch", "jax", "cupy", "array_api"}


def test_installed_metadata_carries_our_entry_points():
    """The installed memcore distribution declares the same entry points (reinstall if not)."""
    eps = importlib.metadata.distribution("memcore").entry_points
    installed = {ep.name: ep.value for ep in eps if ep.group == registry.ENTRY_POINT_GROUP}
    assert installed == DECLARED, "run pip install -e . after editing pyproject.toml"
    entries = registry.registered_backends()
    for name in DECLARED:
        assert entries[name].source == "entry point (memcore)", name


def test_builtin_table_is_the_fallback_without_metadata(monkeypatch):
    """With no entry points at all (a checkout that is not installed) the built-ins remain."""
    _with_entry_points(monkeypatch, [])
    entries = registry.registered_backends()
    assert {n: e.target for n, e in entries.items()} == DECLARED
    assert {e.source for e in entries.values()} == {"built-in"}
    assert entries["array_api"].requires == ("array_api_strict",)


def test_entry_point_with_another_target_takes_precedence(monkeypatch):
    """An entry point reusing a built-in name replaces it; an identical one keeps requires."""
    _with_entry_points(
        monkeypatch, [("jax", "other_jax_port.mod:make"), ("torch", DECLARED["torch"])]
    )
    entries = registry.registered_backends()
    assert entries["jax"].target == "other_jax_port.mod:make"
    assert entries["jax"].requires == ("other_jax_port",)
    assert entries["torch"].requires == ("torch",) and entries["torch"].target == DECLARED["torch"]


def test_describe_reports_versions_from_metadata(monkeypatch):
    """Available backends show their framework's installed version; missing ones show None."""
    monkeypatch.setattr(registry, "_instances", {})
    _with_entry_points(monkeypatch, [("ghost", "no_such_module_xyz:make")])
    rows = {r.name: r for r in registry.describe_backends()}
    assert rows["numpy"].available and rows["numpy"].version == importlib.metadata.version("numpy")
    ghost = rows["ghost"]
    assert (ghost.available, ghost.version, ghost.devices) == (False, None, None)
    assert all(r.devices is None for r in rows.values()), "nothing is loaded, so no devices"
    table = registry.format_backends(list(rows.values()))
    assert "ghost" in table and "not installed" in table and "(not loaded)" in table


def test_describe_lists_devices_of_loaded_backends_and_load_errors(monkeypatch, tmp_path):
    """Loaded backends list devices; load=True loads the rest and reports a failing factory."""
    monkeypatch.setattr(registry, "_instances", {})
    (tmp_path / "broken_port_xyz.py").write_text("def make():\n    raise RuntimeError('no GPU')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _with_entry_points(monkeypatch, [("broken", "broken_port_xyz:make")])
    registry.get_backend("numpy")
    rows = {r.name: r for r in registry.describe_backends()}
    assert rows["numpy"].devices == ("cpu",) and rows["broken"].devices is None
    loaded = {r.name: r for r in registry.describe_backends(load=True)}
    assert "RuntimeError: no GPU" in loaded["broken"].error and loaded["broken"].devices is None
    if loaded["array_api"].available:
        assert "no_float64" in loaded["array_api"].devices
    assert json.dumps([r.to_json() for r in loaded.values()])


def test_listing_and_describing_import_no_backend(tmp_path):
    """Fresh interpreter: registered_backends and describe_backends import no framework."""
    script = textwrap.dedent(
        f"""
        import json, sys
        from memcore import registry
        registry.registered_backends()
        rows = registry.describe_backends()
        registry.format_backends(rows)
        print(json.dumps(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules)))
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


@pytest.mark.parametrize("name", ["numpy", "array_api"])
def test_registered_names_load_through_their_factory(name):
    """get_backend on an entry-point name returns an instance named like the entry."""
    entry = registry.registered_backends()[name]
    if not entry.importable():
        pytest.skip(f"{entry.requires[0]} is not installed")
    assert registry.get_backend(name).name == name
