"""The store of prompt-prefix states: lookup by shared head, whole blocks, budget, eviction order."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from funnelqa.backends.prefix_cache import PrefixCache  # noqa: E402

BLOCK = 4


def states_for(ids: list[int]):
    """Fake states [layers=2, 2, heads=1, tokens, dim=3] whose values name their token and position."""
    tokens = torch.tensor(ids, dtype=torch.float32)
    position = torch.arange(len(ids), dtype=torch.float32)
    row = torch.stack([tokens, position, tokens * 1000 + position], dim=-1)  # [tokens, 3]
    return row.expand(2, 2, 1, len(ids), 3).clone()


def test_lookup_returns_whole_blocks_of_the_longest_stored_prefix():
    cache = PrefixCache(budget_bytes=10**6, block=BLOCK)
    prompt = list(range(10))
    assert cache.lookup(prompt, len(prompt) - 1) == (0, None)
    cache.store(prompt, 0, states_for(prompt))
    assert len(cache) == 2  # tokens 8 and 9 do not fill a block
    longer = prompt[:9] + [99, 98, 97]
    tokens, states = cache.lookup(longer, len(longer) - 1)
    assert tokens == 8
    assert torch.equal(states, states_for(prompt)[:, :, :, :8])
    # Never the whole prompt: its last token must be read anew to get logits.
    assert cache.lookup(prompt[:8], 7)[0] == 4


def test_a_shared_head_is_stored_once_and_tails_branch_from_it():
    cache = PrefixCache(budget_bytes=10**6, block=BLOCK)
    system = [1, 2, 3, 4, 5, 6, 7, 8]
    first, second = system + [10, 11, 12, 13], system + [20, 21, 22, 23]
    cache.store(first, 0, states_for(first))
    start, _ = cache.lookup(second, len(second) - 1)
    assert start == 8
    cache.store(second, start, states_for(second)[:, :, :, start:])
    assert len(cache) == 4  # two head blocks, one tail each
    assert cache.lookup(second + [0], len(second))[0] == 12
    assert torch.equal(cache.lookup(second + [0], len(second))[1], states_for(second))
    # The same tokens after a different head are a different block.
    assert cache.lookup([9, 9, 9, 9] + [10, 11, 12, 13], 8)[0] == 0


def test_budget_evicts_least_recently_used_tails_before_the_heads_they_hang_from():
    one_block = states_for([0] * BLOCK).nbytes
    cache = PrefixCache(budget_bytes=3 * one_block, block=BLOCK)
    head = [1, 2, 3, 4]
    cache.store(head + [5, 6, 7, 8], 0, states_for(head + [5, 6, 7, 8]))
    cache.store(head + [9, 9, 9, 9], 4, states_for(head + [9, 9, 9, 9])[:, :, :, 4:])
    assert len(cache) == 3 and cache.used_bytes == 3 * one_block
    # A third tail: the oldest tail goes, the head that both others need stays.
    cache.store(head + [7, 7, 7, 7], 4, states_for(head + [7, 7, 7, 7])[:, :, :, 4:])
    assert cache.stats.evicted_blocks == 1 and cache.used_bytes <= 3 * one_block
    assert cache.lookup(head + [5, 6, 7, 8, 0], 8)[0] == 4
    assert cache.lookup(head + [9, 9, 9, 9, 0], 8)[0] == 8
    assert cache.lookup(head + [7, 7, 7, 7, 0], 8)[0] == 8


def test_a_zero_budget_keeps_nothing_and_a_tail_without_its_head_is_not_stored():
    empty = PrefixCache(budget_bytes=0, block=BLOCK)
    empty.store(list(range(8)), 0, states_for(list(range(8))))
    assert len(empty) == 0
    cache = PrefixCache(budget_bytes=10**6, block=BLOCK)
    ids = list(range(12))
    cache.store(ids, 4, states_for(ids)[:, :, :, 4:])  # its head block was never stored
    assert len(cache) == 0
    cache.store(ids, 0, states_for(ids))
    cache.clear()
    assert len(cache) == 0 and cache.used_bytes == 0
