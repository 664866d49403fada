import pytest
import torch

from shard_common.model.kv_cache import ROLLBACK_SLACK, KVBudgetExceeded, KVCachePool, UnknownSession


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


def ring_pool(window=4, max_length=4096):
    """Block 0 attends fully, block 1 through a sliding window."""
    return KVCachePool(2, 1, 2, torch.float32, torch.device("cpu"), budget_bytes=1 << 30, max_length=max_length,
                       chunk_tokens=16, windows=[0, window])


def feed(p, session, reference, start, n, window=4):
    """Positions start..start+n through both blocks; checks what attention gets against ``reference``
    (every position's true key, as a full cache would hold it)."""
    c = p.reserve(session, n)
    end = start + n
    new = torch.randn(1, n, 2)
    reference[start:end] = new[0]
    for layer, w in ((0, 0), (1, window)):
        first = max(0, end - w - n + 1) if w else 0
        keys, values = c.update(layer, start, new, new * 2, first)
        assert torch.equal(keys[0], reference[first:end]) and torch.equal(values[0], 2 * reference[first:end])
    c.length = end


def test_a_sliding_window_block_keeps_a_ring_and_attention_sees_its_window():
    p = ring_pool()
    assert p.ring == 4 + ROLLBACK_SLACK
    reference = torch.zeros(2000, 2)
    feed(p, "a", reference, 0, 3)
    # Short of the ring, a sliding block's buffer grows with the session like a full one's.
    c = p.sessions["a"]
    assert c.ring_k.shape[2] == c.capacity == 16 and c.nbytes == p.bytes_for(16) == 2 * 16 * 2 * 1 * 2 * 4
    position = 3
    for n in (1, 1, 70, 1, 200, 1, 1, 5, 1):  # a chunk longer than the ring, decode steps, small verifies
        feed(p, "a", reference, position, n)
        position += n
    c = p.sessions["a"]
    assert c.ring_k.shape[2] == 2 * p.ring and c.capacity >= position
    # A session of any length costs its full blocks per position plus a fixed ring.
    assert c.nbytes == p.bytes_for(c.capacity) < 2 * p.bytes_for(c.capacity // 2)


def test_ring_rollbacks_within_the_slack_work_and_deeper_ones_forget_the_session():
    p = ring_pool()
    reference = torch.zeros(2000, 2)
    feed(p, "a", reference, 0, 300)
    p.rollback("a", 300 - 8)  # a rejected draft
    feed(p, "a", reference, 292, 4)
    feed(p, "a", reference, 296, 1)
    p.fork("a", "b")
    feed(p, "b", reference.clone(), 297, 3)
    feed(p, "a", reference, 297, 2)
    used = p.used_bytes
    p.rollback("a", 200)  # the rings lost positions 200-W..200: nothing half-valid is kept
    assert "a" not in p.sessions and p.length("a") == 0 and p.used_bytes < used
