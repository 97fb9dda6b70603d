"""Tests for DiTCacheManager: eviction order per policy, byte accounting, stats and validation."""

from __future__ import annotations

import random

import pytest
import torch

from vllm_omni.diffusion.cache_manager import (
    DiTCacheManager,
    DiTCacheStats,
    conditioning_key,
    value_nbytes,
)


def block(nbytes: int = 100) -> torch.Tensor:
    """A uint8 tensor of exactly ``nbytes`` bytes."""
    return torch.zeros(nbytes, dtype=torch.uint8)


def keys(cache: DiTCacheManager, candidates: str = "abcdefgh") -> str:
    """The stored keys among ``candidates``, without touching hit/miss counters or order."""
    return "".join(k for k in candidates if k in cache)


# --- eviction order ---------------------------------------------------------------------------------


def test_fifo_evicts_oldest_insertion_regardless_of_gets():
    cache = DiTCacheManager(max_bytes=300, policy="fifo")
    for k in "abc":
        cache.put(k, block())
    assert cache.get("a") is not None  # FIFO ignores use
    cache.put("d", block())
    assert keys(cache) == "bcd"
    cache.put("e", block())
    assert keys(cache) == "cde"


def test_lru_evicts_least_recently_used():
    cache = DiTCacheManager(max_bytes=300, policy="lru")
    for k in "abc":
        cache.put(k, block())
    cache.get("a")  # order now b, c, a
    cache.put("d", block())
    assert keys(cache) == "acd"
    cache.get("c")  # order now a, d, c
    cache.put("e", block())
    assert keys(cache) == "cde"


def test_lfu_evicts_least_frequently_used():
    cache = DiTCacheManager(max_bytes=300, policy="lfu")
    for k in "abc":
        cache.put(k, block())
    for _ in range(3):
        cache.get("a")
    cache.get("b")
    cache.put("d", block())  # c has the fewest uses
    assert keys(cache) == "abd"
    cache.get("d")
    cache.get("d")  # uses: a=4, b=2, d=3
    cache.put("e", block())
    assert keys(cache) == "ade"


def test_lfu_breaks_ties_by_least_recent_use():
    cache = DiTCacheManager(max_bytes=300, policy="lfu")
    for k in "abc":
        cache.put(k, block())
    for k in "cab":  # all at 2 uses; c is least recently used
        cache.get(k)
    cache.put("d", block())
    assert keys(cache) == "abd"
    # d has 1 use, the fewest, even though it is the most recent.
    cache.put("e", block())
    assert keys(cache) == "abe"


def test_lfu_many_accesses_keep_order_correct():
    """Exercises the heap's stale-entry compaction with many accesses."""
    cache = DiTCacheManager(max_bytes=300, policy="lfu")
    for k in "abc":
        cache.put(k, block())
    for i in range(500):
        cache.get("a")
        if i % 2:
            cache.get("b")
    cache.get("c")
    cache.put("d", block())
    assert keys(cache) == "abd"
    cache.put("e", block())  # d (1 use) goes before b (251 uses)
    assert keys(cache) == "abe"


@pytest.mark.parametrize("policy", ["fifo", "lru", "lfu"])
def test_put_evicts_as_many_entries_as_needed(policy):
    cache = DiTCacheManager(max_bytes=300, policy=policy)
    for k in "abc":
        cache.put(k, block())
    assert cache.put("d", block(250))
    assert keys(cache) == "d"
    assert cache.stats.evictions == 3
    assert cache.stats.bytes == 250


def _reference_victim(policy: str, ref: dict[int, list[int]]) -> int:
    """Brute-force victim choice; ``ref`` maps key -> [size, inserted_at, last_used_at, uses]."""
    rank = {
        "fifo": lambda k: ref[k][1],
        "lru": lambda k: ref[k][2],
        "lfu": lambda k: (ref[k][3], ref[k][2]),
    }[policy]
    return min(ref, key=rank)


@pytest.mark.parametrize("policy", ["fifo", "lru", "lfu"])
@pytest.mark.parametrize("seed", range(5))
def test_random_workload_matches_brute_force_reference(policy, seed):
    rng = random.Random(seed)
    cache = DiTCacheManager(max_bytes=500, policy=policy)
    ref: dict[int, list[int]] = {}
    for now in range(2000):
        key = rng.randrange(12)
        if rng.random() < 0.5:
            assert (cache.get(key) is not None) == (key in ref)
            if key in ref:
                ref[key][2] = now
                ref[key][3] += 1
            continue
        size = rng.randrange(0, 220)
        cache.put(key, block(size))
        ref.pop(key, None)
        while sum(v[0] for v in ref.values()) + size > 500:
            del ref[_reference_victim(policy, ref)]
        ref[key] = [size, now, now, 1]
        assert {k for k in range(12) if k in cache} == set(ref)
        assert cache.stats.bytes == sum(v[0] for v in ref.values())


# --- byte accounting --------------------------------------------------------------------------------


def test_value_nbytes_mixed_dtypes_and_nesting():
    value = {
        "prompt_embeds": torch.zeros(2, 3, dtype=torch.float32),  # 24
        "pooled": (torch.zeros(4, dtype=torch.float16), None),  # 8
        "masks": [torch.ones(5, dtype=torch.bool), [torch.zeros(3, dtype=torch.int64)]],  # 5 + 24
        "negative": None,
    }
    assert value_nbytes(value) == 24 + 8 + 5 + 24
    assert value_nbytes(None) == 0
    assert value_nbytes(torch.zeros(0, 7)) == 0
    assert value_nbytes(torch.zeros(3, dtype=torch.bfloat16)) == 6


def test_value_nbytes_counts_viewed_tensor_not_its_storage():
    base = torch.zeros(100, dtype=torch.float32)
    assert value_nbytes(base[:10]) == 40


def test_value_nbytes_rejects_unsupported_types():
    with pytest.raises(TypeError, match="got str"):
        value_nbytes([torch.zeros(1), "text"])


def test_cache_tracks_bytes_across_put_replace_evict_and_clear():
    cache = DiTCacheManager(max_bytes=100, policy="lru")
    cache.put("a", (torch.zeros(4, dtype=torch.float64), torch.zeros(2, dtype=torch.float16)))  # 36
    cache.put("b", {"x": torch.zeros(10, dtype=torch.int32)})  # 40
    assert cache.stats.bytes == 76
    cache.put("a", torch.zeros(5, dtype=torch.int16))  # replaces 36 with 10
    assert cache.stats.bytes == 50
    cache.put("c", torch.zeros(15, dtype=torch.float32))  # 60 > 50 free: evicts b (LRU), keeps a
    assert keys(cache) == "ac"
    assert cache.stats.bytes == 70
    cache.clear()
    assert len(cache) == 0
    assert cache.stats.bytes == 0


def test_unsupported_value_leaves_cache_unchanged():
    cache = DiTCacheManager(max_bytes=100)
    cache.put("a", block(10))
    with pytest.raises(TypeError):
        cache.put("a", {"x": 3})
    assert cache.get("a") is not None
    assert cache.stats.bytes == 10


# --- oversize, disabled, replacement ----------------------------------------------------------------


def test_oversize_value_is_rejected_without_evicting():
    cache = DiTCacheManager(max_bytes=100)
    cache.put("a", block(60))
    assert not cache.put("big", block(101))
    assert "big" not in cache
    assert keys(cache) == "a"
    assert cache.stats.rejected == 1
    assert cache.stats.evictions == 0
    assert cache.put("exact", block(100))  # exactly max_bytes fits
    assert keys(cache, ["a", "exact"]) == "exact"


def test_oversize_replacement_drops_the_old_entry():
    cache = DiTCacheManager(max_bytes=100)
    cache.put("a", block(50))
    assert not cache.put("a", block(200))
    assert "a" not in cache
    assert cache.stats.bytes == 0
    assert cache.stats.rejected == 1


def test_disabled_cache_stores_nothing_and_always_misses():
    cache = DiTCacheManager(max_bytes=0)
    assert not cache.put("a", block(1))
    assert not cache.put("empty", None)
    assert len(cache) == 0
    assert "a" not in cache
    assert cache.get("a") is None
    assert cache.get("empty") is None
    assert cache.stats == DiTCacheStats(
        hits=0, misses=2, evictions=0, rejected=0, entries=0, bytes=0, max_bytes=0
    )


def test_replacing_existing_key_returns_new_value():
    cache = DiTCacheManager(max_bytes=1000)
    old, new = torch.zeros(3), torch.ones(5)
    cache.put("k", old)
    cache.put("k", new)
    assert len(cache) == 1
    assert cache.get("k") is new
    assert cache.stats.bytes == 20
    assert cache.stats.evictions == 0


def test_replacement_counts_as_fresh_insertion_for_fifo():
    cache = DiTCacheManager(max_bytes=300, policy="fifo")
    for k in "abc":
        cache.put(k, block())
    cache.put("a", block())  # a moves to the back
    cache.put("d", block())
    assert keys(cache) == "acd"


def test_replacement_resets_lfu_uses():
    cache = DiTCacheManager(max_bytes=200, policy="lfu")
    cache.put("a", block())
    cache.put("b", block())
    for _ in range(3):
        cache.get("a")
    cache.get("b")
    cache.put("a", block())  # a back to 1 use; b has 2
    cache.put("c", block())
    assert keys(cache) == "bc"


def test_get_returns_stored_object_without_copy():
    cache = DiTCacheManager(max_bytes=1000)
    value = {"embeds": torch.randn(2, 3), "mask": None}
    cache.put(("enc", "p"), value)
    got = cache.get(("enc", "p"))
    assert got is value
    assert got["embeds"] is value["embeds"]


# --- stats ------------------------------------------------------------------------------------------


def test_stats_counts():
    cache = DiTCacheManager(max_bytes=200, policy="lru")
    assert cache.stats.hit_rate == 0.0
    cache.put("a", block())
    cache.put("b", block())
    cache.get("a")
    cache.get("a")
    cache.get("zzz")
    cache.put("c", block())  # evicts b
    cache.get("b")
    cache.put("huge", block(201))
    stats = cache.stats
    assert stats == DiTCacheStats(
        hits=2, misses=2, evictions=1, rejected=1, entries=2, bytes=200, max_bytes=200
    )
    assert stats.hit_rate == 0.5


def test_contains_does_not_count_or_refresh():
    cache = DiTCacheManager(max_bytes=200, policy="lru")
    cache.put("a", block())
    cache.put("b", block())
    assert "a" in cache
    assert "missing" not in cache
    assert cache.stats.hits == cache.stats.misses == 0
    cache.put("c", block())  # a still least recently used
    assert keys(cache) == "bc"


def test_clear_keeps_counters():
    cache = DiTCacheManager(max_bytes=200)
    cache.put("a", block())
    cache.get("a")
    cache.clear()
    assert cache.get("a") is None
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.entries, stats.bytes) == (1, 1, 0, 0)
    cache.put("a", block())  # usable after clear
    assert cache.get("a") is not None


def test_stats_is_frozen():
    stats = DiTCacheManager(max_bytes=10).stats
    with pytest.raises(AttributeError):
        stats.hits = 5


# --- validation -------------------------------------------------------------------------------------


def test_bad_policy_error_names_field_and_choices():
    with pytest.raises(ValueError, match=r"policy must be one of fifo, lru, lfu; got 'mru'"):
        DiTCacheManager(max_bytes=10, policy="mru")


def test_negative_max_bytes_error():
    with pytest.raises(ValueError, match=r"max_bytes must be >= 0 .*got -1"):
        DiTCacheManager(max_bytes=-1)


@pytest.mark.parametrize("policy", ["fifo", "lru", "lfu"])
def test_properties(policy):
    cache = DiTCacheManager(max_bytes=123, policy=policy)
    assert cache.policy == policy
    assert cache.max_bytes == 123


# --- conditioning_key -------------------------------------------------------------------------------


def test_conditioning_key_is_hashable_and_order_independent():
    k1 = conditioning_key("t5", "a cat", None, max_sequence_length=512, dtype="bf16")
    k2 = conditioning_key("t5", "a cat", None, dtype="bf16", max_sequence_length=512)
    assert k1 == k2
    assert hash(k1) == hash(k2)
    assert k1 == ("t5", "a cat", None, (("dtype", "bf16"), ("max_sequence_length", 512)))


def test_conditioning_key_distinguishes_inputs():
    base = conditioning_key("t5", "a cat", None, max_sequence_length=512)
    others = [
        conditioning_key("clip", "a cat", None, max_sequence_length=512),
        conditioning_key("t5", "a dog", None, max_sequence_length=512),
        conditioning_key("t5", "a cat", "", max_sequence_length=512),
        conditioning_key("t5", "a cat", "blurry", max_sequence_length=512),
        conditioning_key("t5", "a cat", None, max_sequence_length=256),
        conditioning_key("t5", "a cat", None),
    ]
    assert len({base, *others}) == len(others) + 1


def test_conditioning_key_rejects_unhashable_option():
    with pytest.raises(TypeError, match="option 'sizes' is not hashable"):
        conditioning_key("t5", "a cat", None, sizes=[1, 2])


def test_conditioning_key_works_as_cache_key():
    cache = DiTCacheManager(max_bytes=1000)
    embeds = torch.randn(1, 4, 8)
    cache.put(conditioning_key("t5", "a cat", None, max_sequence_length=77), embeds)
    assert cache.get(conditioning_key("t5", "a cat", None, max_sequence_length=77)) is embeds
    assert cache.get(conditioning_key("t5", "a cat", None, max_sequence_length=78)) is None
