"""Public names agree: MemoryConfig takes num_heads (the ops' and modules' keyword) as well
as heads; the torch modules document their constructors and print their sizes."""

from __future__ import annotations

import importlib.util
import inspect

import attrs
import pytest

from memcore import MemoryConfig
from memcore.errors import MemcoreError

needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="torch is not installed"
)


@pytest.mark.parametrize("H", [1, 2, 4])
def test_memory_config_takes_num_heads_and_heads_alike(H):
    """num_heads= and heads= give equal (and equally hashed) configs; evolve keeps working."""
    a, b = MemoryConfig(4, 8, num_heads=H), MemoryConfig(4, 8, heads=H)
    assert a == b and hash(a) == hash(b) and a.num_heads == a.heads == H
    assert attrs.evolve(a, tau=0.5) == MemoryConfig(slots=4, dim=8, num_heads=H, tau=0.5)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"heads": 2, "num_heads": 4}, "`num_heads` and `heads` are one setting"),
        ({"num_heads": 0}, "must be an integer >= 1"),
        ({"num_heads": "2"}, "must be an integer >= 1"),
        ({"num_heads": 3}, "must be divisible"),
        ({"num_heads": 2.0}, "must be an integer >= 1"),
    ],
)
def test_memory_config_bad_heads(kwargs, fragment):
    """Conflicting or bad head counts are MemcoreErrors naming the setting."""
    with pytest.raises(MemcoreError, match=fragment):
        MemoryConfig(4, 8, **kwargs)


@needs_torch
@pytest.mark.parametrize(
    ("cls", "args", "shown"),
    [
        ("MemoryReader", (8, 2), "MemoryReader(dim=8, num_heads=2)"),
        ("MemoryWriter", (4, 8, 2), "MemoryWriter(slots=4, dim=8, num_heads=2, tau=0.25)"),
        ("SABCell", (3, 5, 2, 4), "SABCell(input_size=3, hidden_size=5, output_size=2,"),
    ],
)
def test_torch_modules_document_init_and_print_sizes(cls, args, shown):
    """help(Module.__init__) shows memcore's Args, not torch's generic text; print shows sizes."""
    from memcore.backends.torch import modules

    module_cls = getattr(modules, cls)
    doc = inspect.getdoc(module_cls.__init__) or ""
    assert "Args:" in doc and "Initialize internal Module state" not in doc
    assert str(module_cls(*args)).startswith(shown)
