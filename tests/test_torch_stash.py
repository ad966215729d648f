"""MemoryStash: MRBP's memories kept on the device or offloaded to pinned host memory."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the stash is torch code")

from memcore.backends.torch.stash import MemoryStash
from memcore.errors import MemcoreError

CUDA = torch.cuda.is_available()


def _roundtrip(stash: MemoryStash, device: str, n: int = 5) -> None:
    xs = [torch.randn(3, 4, 6, device=device) for _ in range(n)]
    copies = [x.clone() for x in xs]
    for x in xs:
        stash.push(x)
    assert len(stash) == n
    for want in reversed(copies):
        got = stash.pop()
        assert got.device == want.device and torch.equal(got, want)
    assert len(stash) == 0
    assert all(torch.equal(x, c) for x, c in zip(xs, copies))  # inputs untouched


@pytest.mark.parametrize("where", ["device", "host"])
def test_stash_is_a_stack_on_the_cpu(where):
    _roundtrip(MemoryStash(where), "cpu")


def test_stash_interleaves_push_and_pop():
    stash = MemoryStash("host")
    a, b, c = (torch.full((2,), float(v)) for v in (1, 2, 3))
    stash.push(a)
    stash.push(b)
    assert torch.equal(stash.pop(), b)
    stash.push(c)
    assert torch.equal(stash.pop(), c) and torch.equal(stash.pop(), a)


def test_stash_errors_name_the_argument():
    with pytest.raises(MemcoreError, match=r"`where` must be one of 'device', 'host'.*'disk'"):
        MemoryStash("disk")
    with pytest.raises(MemcoreError, match=r"`tensor` must be a torch.Tensor.*list"):
        MemoryStash().push([1.0])
    with pytest.raises(MemcoreError, match="empty MemoryStash"):
        MemoryStash().pop()


@pytest.mark.parametrize("where", ["device", "host"])
def test_stash_keeps_pytrees(where):
    """push_tree/pop_tree keep a pytree memory's structure, newest first."""
    stash = MemoryStash(where)
    a = {"a": torch.ones(2), "b": (torch.zeros(3), torch.full((1,), 2.0))}
    b = {"a": torch.full((2,), 5.0), "b": (torch.ones(3), torch.zeros(1))}
    stash.push_tree(a)
    stash.push_tree(b)
    for want in (b, a):
        got = stash.pop_tree()
        assert set(got) == {"a", "b"} and isinstance(got["b"], tuple)
        assert torch.equal(got["a"], want["a"]) and torch.equal(got["b"][1], want["b"][1])
    with pytest.raises(MemcoreError, match="pop_tree needs an earlier push_tree"):
        stash.pop_tree()
    with pytest.raises(MemcoreError, match=r"leaves are all torch.Tensors.*float"):
        stash.push_tree({"a": 1.0})


def test_stash_detaches():
    x = torch.randn(2, requires_grad=True)
    stash = MemoryStash()
    stash.push(x * 2)
    assert not stash.pop().requires_grad


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("prefetch", [True, False])
def test_stash_offloads_to_pinned_host_memory_on_cuda(prefetch):
    stash = MemoryStash("host", prefetch=prefetch)
    _roundtrip(stash, "cuda")
    x = torch.randn(256, 1024, device="cuda")
    stash.push(x)
    assert stash.host_bytes == x.nbytes
    assert stash._items[-1].host.is_pinned()


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_stash_host_keeps_device_memory_flat():
    """Pushing 8 (32 MiB) tensors to the host leaves at most a few of them on the device."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    stash = MemoryStash("host")
    x = torch.randn(8 << 20, device="cuda")
    for _ in range(8):
        stash.push(x.clone())  # each clone is freed once its copy has been read
    torch.cuda.synchronize()
    torch.empty(1, device="cuda")  # an allocation lets the allocator retire finished frees
    held = torch.cuda.memory_allocated() - base - x.nbytes
    assert held <= 2 * x.nbytes, held
    for _ in range(8):
        assert torch.equal(stash.pop(), x)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_stash_survives_the_source_being_overwritten_after_push():
    """A pushed clone is safe even if the caller reuses its source buffer at once."""
    buf = torch.randn(1 << 20, device="cuda")
    stash = MemoryStash("host")
    want = []
    for i in range(4):
        buf.mul_(1.5).add_(i)
        want.append(buf.clone())
        stash.push(buf.clone())
    for w in reversed(want):
        assert torch.equal(stash.pop(), w)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_train_mrbp_host_stash_matches_device_stash_on_cuda():
    """Offloading MRBP's memories on a GPU gives bit-identical gradients and loss."""
    from memcore.backends.torch import MemoryReader, MemoryWriter, train_mrbp

    torch.manual_seed(0)
    T, B, L, K, D, H = 6, 2, 5, 4, 16, 2
    reader = MemoryReader(D, H, dtype=torch.float64).cuda()
    writer = MemoryWriter(K, D, H, dtype=torch.float64).cuda()
    xs = torch.randn(T, B, L, D, dtype=torch.float64, device="cuda")
    targets = torch.randn(T, B, L, D, dtype=torch.float64, device="cuda")
    results = {}
    for stash in ("device", "host"):
        for p in [*reader.parameters(), *writer.parameters()]:
            p.grad = None
        res = train_mrbp(reader, writer, xs, writer.init_memory(B), targets, stash=stash)
        grads = [p.grad.clone() for p in [*reader.parameters(), *writer.parameters()]]
        results[stash] = (res.loss, grads)
    assert results["device"][0] == results["host"][0]
    assert all(torch.equal(a, b) for a, b in zip(results["device"][1], results["host"][1]))
