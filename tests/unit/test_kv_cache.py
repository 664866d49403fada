import pytest
import torch

from shard_common.model.kv_batch import padded_keys
from shard_common.model.kv_cache import INITIAL_PAGES, ROLLBACK_SLACK, KVBudgetExceeded, KVCachePool, UnknownSession


def pool(budget_tokens=1024, max_length=4096, page=16):
    def make(budget_bytes):
        return KVCachePool(2, 1, 4, torch.float32, torch.device("cpu"), budget_bytes=budget_bytes, max_length=max_length, page_tokens=page)
    return make(make(0).bytes_for(budget_tokens))


def write(p, session, start, values):
    """Positions start.. of ``session`` get ``values`` ([n]) as every key and value component,
    the way a forward writes them."""
    c = p.reserve(session, len(values))
    for store in p.stores:
        slots = c.slots[p.stores.index(store)][start:start + len(values)]
        store.k[:, :, slots] = values.view(1, 1, -1, 1)
        store.v[:, :, slots] = 2 * values.view(1, 1, -1, 1)
    p.advance(c, start + len(values))
    return c


def read(p, session, first, end, store=0):
    c = p.sessions[session]
    slots = c.slots[store][first:end]
    return p.stores[store].k[0, 0, slots, 0], p.stores[store].v[0, 0, slots, 0]


def test_grows_a_page_at_a_time_and_keeps_contents():
    p = pool()
    c = write(p, "a", 0, torch.arange(10.0))
    assert len(c.pages[0]) == 1 and p.used_bytes == p.bytes_for(16)
    # Enough sessions that the store itself must grow (a copy of everything held).
    for i in range(INITIAL_PAGES):
        write(p, f"s{i}", 0, torch.full((20,), float(i)))
    write(p, "a", 10, torch.arange(10.0, 30.0))
    assert p.stores[0].pages > INITIAL_PAGES
    assert torch.equal(read(p, "a", 0, 30)[0], torch.arange(30.0))
    assert torch.equal(read(p, "s3", 0, 20)[1], torch.full((20,), 6.0))
    assert p.used_bytes == p.bytes_for(32) * (1 + INITIAL_PAGES)
    assert 0 not in c.pages[0]  # page 0 is the zero page padding reads point at


def test_the_store_grows_no_further_than_the_budget():
    p = pool(budget_tokens=40 * 16)
    for i in range(40):
        p.reserve(f"s{i}", 16)
    assert p.stores[0].pages == 41  # 40 pages and the zero page, not the 64 doubling would give
    with pytest.raises(KVBudgetExceeded):
        p.reserve("more", 1)


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
    write(p, "a", 0, torch.arange(8.0))
    p.rollback("a", 3)
    assert p.length("a") == 3
    with pytest.raises(ValueError):
        p.rollback("a", 5)
    with pytest.raises(UnknownSession):
        p.rollback("zzz", 2)


def test_fork_copies_valid_positions():
    p = pool()
    write(p, "a", 0, torch.arange(5.0))
    p.fork("a", "b")
    assert p.length("b") == 5 and torch.equal(read(p, "b", 0, 5)[0], torch.arange(5.0))
    write(p, "b", 5, torch.tensor([9.0]))
    p.rollback("b", 0)
    write(p, "b", 0, torch.zeros(3))
    assert torch.equal(read(p, "a", 0, 5)[0], torch.arange(5.0))  # the copy is its own
    assert p.used_bytes == 2 * p.bytes_for(16)


def test_expire_idle_and_an_empty_pool_gives_its_memory_back():
    p = pool()
    for i in range(2 * INITIAL_PAGES):
        p.reserve(f"x{i}", 1).last_used = 100.0
    p.reserve("a", 1).last_used = 0.0
    assert p.expire_idle(now=110.0, idle_seconds=50) == ["a"]
    assert len(p.sessions) == 2 * INITIAL_PAGES and p.stores[0].pages > INITIAL_PAGES
    for i in range(2 * INITIAL_PAGES):
        p.free(f"x{i}")
    assert p.used_bytes == 0 and p.stores[0].pages == INITIAL_PAGES


def ring_pool(window=4, max_length=4096):
    """Block 0 attends fully, block 1 through a sliding window."""
    return KVCachePool(2, 1, 2, torch.float32, torch.device("cpu"), budget_bytes=1 << 30, max_length=max_length,
                       page_tokens=16, windows=[0, window])


def feed(p, session, reference, start, n, window=4):
    """Positions start..start+n through both blocks; checks what attention would read against
    ``reference`` (every position's true key, as a full cache would hold it)."""
    new = torch.randn(n)
    reference[start:start + n] = new
    write(p, session, start, new)
    end = start + n
    for store, w in ((0, 0), (1, window)):
        first = max(0, end - w - n + 1) if w else 0
        keys, values = read(p, session, first, end, store)
        assert torch.equal(keys, reference[first:end]) and torch.equal(values, 2 * reference[first:end])


def test_a_sliding_window_block_keeps_a_ring_and_attention_sees_its_window():
    p = ring_pool()
    assert p.ring == 4 + ROLLBACK_SLACK
    reference = torch.zeros(2000)
    feed(p, "a", reference, 0, 3)
    position = 3
    for n in (1, 1, 70, 1, 200, 1, 1, 5, 1):  # a chunk longer than the ring, decode steps, small verifies
        feed(p, "a", reference, position, n)
        position += n
    c = p.sessions["a"]
    # The sliding store let go of every page wholly before the ring; the full store kept all.
    assert c.dropped[1] > 0 and all(page == 0 for page in c.pages[1][:c.dropped[1]])
    assert len(c.held()[1]) <= -(-p.ring // 16) + 1 and len(c.held()[0]) == -(-position // 16)
    assert p.used_bytes == sum(len(pages) * s.page_bytes for pages, s in zip(c.held(), p.stores))
    # A session of any length costs its full blocks per position plus a fixed ring.
    assert p.bytes_for(4096) < 2 * p.bytes_for(2048)


def test_ring_rollbacks_within_the_slack_work_and_deeper_ones_forget_the_session():
    p = ring_pool()
    reference = torch.zeros(2000)
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


def test_padded_key_widths_bound_the_waste_and_never_shrink():
    widths = [padded_keys(n) for n in range(1, 5000)]
    assert all(n <= w <= max(32, n * 1.25) for n, w in zip(range(1, 5000), widths))
    assert widths == sorted(widths) and len(set(widths)) < 50


def test_row_keys_name_exactly_the_positions_each_row_may_see():
    """What the native kernels read: per row, the slots of its session's positions up to its own,
    within its window on a sliding-window block; a long chunk goes the prefill way."""
    from shard_common.model.kv_batch import Entry, KVBatch

    p = ring_pool(window=4)
    write(p, "a", 0, torch.zeros(10))
    write(p, "b", 0, torch.zeros(5))
    entries = [Entry(p.reserve("a", 3), 10, 3), Entry(p.reserve("b", 1), 5, 1), Entry(p.reserve("c", 20), 0, 20)]
    batch = KVBatch(p, entries, n_kv_heads=1, group=1, device=torch.device("cpu"))
    a, b = p.sessions["a"], p.sessions["b"]
    for layer, window in ((0, 0), (1, 4)):
        keys = batch.row_keys(layer, window)
        assert keys.rows.tolist() == [0, 1, 2, 3]
        seen = [keys.slots[begin:begin + count].tolist() for begin, count in zip(keys.begin.tolist(), keys.count.tolist())]
        store = p.layers[layer][0]
        expected = [a.slots[store][(max(0, pos - window + 1) if window else 0):pos + 1].tolist() for pos in (10, 11, 12)]
        expected.append(b.slots[store][(max(0, 5 - window + 1) if window else 0):6].tolist())
        assert seen == expected
        assert [(r.row, r.n) for r in keys.prefill] == [(4, 20)]
