import pytest
import torch

from shard_common.model.kv_cache import KVBudgetExceeded, KVCachePool, UnknownSession


def pool(budget_tokens=1024, max_length=4096, chunk=16):
    p = KVCachePool(2, 1, 4, torch.float32, torch.device("cpu"), budget_bytes=0, max_length=max_length, chunk_tokens=chunk)
    p.budget_bytes = p.bytes_for(budget_tokens)
    return p


def test_grows_in_chunks_and_keeps_contents():
    p = pool()
    c = p.reserve("a", 10)
    assert c.capacity == 16
    c.k[:, :, :10] = 1.0
    c.length = 10
    c = p.reserve("a", 10)
    assert c.capacity == 32
    assert torch.all(c.k[:, :, :10] == 1.0)
    assert p.used_bytes == p.bytes_for(32)


def test_budget_exhaustion_is_a_clear_error():
    p = pool(budget_tokens=32)
    p.reserve("a", 30)
    with pytest.raises(KVBudgetExceeded, match="budget exhausted"):
        p.reserve("b", 5)
    p.free("a")
    assert p.used_bytes == 0
    p.reserve("b", 5)


def test_context_window_limit():
    p = pool(max_length=20)
    with pytest.raises(KVBudgetExceeded, match="context window"):
        p.reserve("a", 21)


def test_rollback_bounds():
    p = pool()
    c = p.reserve("a", 8)
    c.length = 8
    p.rollback("a", 3)
    assert p.length("a") == 3
    with pytest.raises(ValueError):
        p.rollback("a", 5)
    with pytest.raises(UnknownSession):
        p.rollback("zzz", 2)


def test_fork_copies_valid_positions():
    p = pool()
    c = p.reserve("a", 5)
    c.k[:, :, :5] = torch.arange(5.0).view(1, 1, 5, 1)
    c.length = 5
    p.fork("a", "b")
    b = p.sessions["b"]
    assert b.length == 5 and torch.equal(b.k[:, :, :5], c.k[:, :, :5])
    b.k.zero_()
    assert c.k[0, 0, 4, 0] == 4.0


def test_expire_idle():
    p = pool()
    p.reserve("a", 1).last_used = 0.0
    p.reserve("b", 1).last_used = 100.0
    assert p.expire_idle(now=110.0, idle_seconds=50) == ["a"]
    assert list(p.sessions) == ["b"]
