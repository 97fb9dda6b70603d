"""Byte-bounded cache for the conditioning tensors of diffusion (DiT) models.

A diffusion pipeline encodes every prompt (and negative prompt) with one or more text encoders before
denoising starts. Serving workloads repeat identical prompts across requests (retries, batch variations
of one prompt, fixed negative prompts, seed sweeps), and each repeat runs the same text encoder to
produce the same tensors. :class:`DiTCacheManager` keeps those encoder outputs keyed by
:func:`conditioning_key`, so a repeated prompt skips text encoding entirely.

The cache is bounded by the bytes of the tensors it holds and evicts entries with a FIFO, LRU or LFU
policy. Tensors are stored as given, on whatever device the caller put them on, and are returned
without copying: callers must not mutate returned tensors in place, or later hits see the change.
The cache is not thread-safe; guard it with a lock if several threads share one instance.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

POLICIES = ("fifo", "lru", "lfu")


@dataclass(frozen=True)
class DiTCacheStats:
    """A snapshot of a :class:`DiTCacheManager`'s counters and occupancy.

    Attributes:
        hits: ``get`` calls that found their key.
        misses: ``get`` calls that did not.
        evictions: Entries removed by the policy to make room for a new one.
        rejected: ``put`` calls whose value alone was bigger than ``max_bytes``.
        entries: Entries currently held.
        bytes: Bytes of tensor data currently held.
        max_bytes: The byte budget (0 means the cache is disabled).
    """

    hits: int
    misses: int
    evictions: int
    rejected: int
    entries: int
    bytes: int
    max_bytes: int

    @property
    def hit_rate(self) -> float:
        """Fraction of ``get`` calls that hit; 0.0 before any ``get``."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


def value_nbytes(value: Any) -> int:
    """Return the bytes of tensor data in ``value``: ``numel() * element_size()`` summed over its tensors.

    ``value`` is a tensor, ``None``, or a tuple, list or dict (any nesting) of those; dict keys are not
    counted. A tensor that appears twice is counted twice.

    Raises:
        TypeError: if the structure holds anything else.
    """
    if value is None:
        return 0
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(value_nbytes(item) for item in value)
    if isinstance(value, dict):
        return sum(value_nbytes(item) for item in value.values())
    raise TypeError(
        f"cache values must be tensors, None, or tuples/lists/dicts of them; got {type(value).__name__}"
    )


def conditioning_key(encoder_id: str, prompt: str, negative_prompt: str | None, **options: Any) -> tuple:
    """Build the cache key for one text-encoding call.

    Args:
        encoder_id: Identifies the text encoder(s) and their weights, e.g. the model path and revision.
            Outputs of different encoders must never share a key.
        prompt: The positive prompt.
        negative_prompt: The negative prompt, or ``None``. ``None`` and ``""`` give different keys,
            since pipelines may treat them differently.
        **options: Every other input that changes the encoder's output, such as
            ``max_sequence_length``, dtype or device. Included sorted by name, so keyword order does
            not matter.

    Returns:
        ``(encoder_id, prompt, negative_prompt, ((name, value), ...))``: a hashable tuple that compares
        equal for equal inputs.

    Raises:
        TypeError: if an option value is not hashable (pass a tuple instead of a list).
    """
    for name, value in options.items():
        try:
            hash(value)
        except TypeError:
            message = f"conditioning_key option {name!r} is not hashable: {type(value).__name__}"
            raise TypeError(message) from None
    return (encoder_id, prompt, negative_prompt, tuple(sorted(options.items())))


class _OrderedPolicy:
    """FIFO or LRU eviction order: an OrderedDict whose first key is the next victim."""

    def __init__(self, refresh_on_access: bool) -> None:
        self._refresh_on_access = refresh_on_access
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def record_insert(self, key: Hashable) -> None:
        self._order[key] = None

    def record_access(self, key: Hashable) -> None:
        if self._refresh_on_access:
            self._order.move_to_end(key)

    def discard(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def pop_victim(self) -> Hashable:
        key, _ = self._order.popitem(last=False)
        return key

    def clear(self) -> None:
        self._order.clear()


class _LFUPolicy:
    """LFU eviction order, ties broken by least recent use: a heap of ``(uses, tick, key)``.

    Each access pushes a fresh heap entry; the old one goes stale and is skipped (lazy deletion) when it
    reaches the top. ``_current`` maps each live key to its latest ``(uses, tick)``. The heap is rebuilt
    from ``_current`` when stale entries outnumber live ones, so it stays O(n) in size and every
    operation is amortized O(log n).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Hashable]] = []
        self._current: dict[Hashable, tuple[int, int]] = {}
        self._ticks = itertools.count()

    def record_insert(self, key: Hashable) -> None:
        self._push(key, uses=1)

    def record_access(self, key: Hashable) -> None:
        uses, _ = self._current[key]
        self._push(key, uses + 1)

    def discard(self, key: Hashable) -> None:
        self._current.pop(key, None)

    def pop_victim(self) -> Hashable:
        while True:
            uses, tick, key = heapq.heappop(self._heap)
            if self._current.get(key) == (uses, tick):
                del self._current[key]
                return key

    def clear(self) -> None:
        self._heap.clear()
        self._current.clear()

    def _push(self, key: Hashable, uses: int) -> None:
        tick = next(self._ticks)  # unique, so heap entries never compare keys
        self._current[key] = (uses, tick)
        heapq.heappush(self._heap, (uses, tick, key))
        if len(self._heap) > 2 * len(self._current) + 32:
            self._compact()

    def _compact(self) -> None:
        self._heap = [(uses, tick, key) for key, (uses, tick) in self._current.items()]
        heapq.heapify(self._heap)


def _make_policy(policy: str) -> _OrderedPolicy | _LFUPolicy:
    if policy == "lfu":
        return _LFUPolicy()
    return _OrderedPolicy(refresh_on_access=policy == "lru")


class DiTCacheManager:
    """A cache of text-encoder outputs bounded by the bytes of the tensors it holds.

    Values are tensors, ``None``, or tuples, lists or dicts of them (any nesting); their size is
    :func:`value_nbytes`. Values are stored and returned as given (no copy, no device move), so callers
    must not mutate returned tensors in place. Not thread-safe.

    Policies, applied when a ``put`` needs room:

    - ``"fifo"``: evict the entry inserted first; ``get`` does not change the order.
    - ``"lru"``: evict the entry least recently inserted or returned by ``get``.
    - ``"lfu"``: evict the entry with the fewest uses (its ``put`` plus its ``get`` hits), ties broken
      by least recent use.

    Every operation is O(1), or amortized O(log n) for LFU, plus the victims it evicts.
    """

    def __init__(self, max_bytes: int, policy: str = "lru") -> None:
        """Create an empty cache.

        Args:
            max_bytes: Byte budget for the stored tensors; 0 disables the cache (every ``get`` misses
                and ``put`` stores nothing).
            policy: Eviction policy: ``"fifo"``, ``"lru"`` or ``"lfu"``.

        Raises:
            ValueError: if ``max_bytes`` is negative or ``policy`` is not one of the above.
        """
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 (0 disables the cache), got {max_bytes}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        self._max_bytes = max_bytes
        self._policy_name = policy
        self._order = _make_policy(policy)
        self._entries: dict[Hashable, tuple[Any, int]] = {}
        self._bytes = 0
        self._hits = self._misses = self._evictions = self._rejected = 0

    @property
    def max_bytes(self) -> int:
        """The byte budget; 0 means disabled."""
        return self._max_bytes

    @property
    def policy(self) -> str:
        """The eviction policy name."""
        return self._policy_name

    def get(self, key: Hashable) -> Any | None:
        """Return the value stored under ``key``, or ``None`` if absent.

        Counts a hit or a miss, and on a hit updates the key's recency (LRU) or use count (LFU).
        The returned tensors are the stored ones: do not mutate them in place.
        """
        entry = self._entries.get(key)
        if entry is None:
            self._misses += 1
            return None
        self._hits += 1
        self._order.record_access(key)
        return entry[0]

    def put(self, key: Hashable, value: Any) -> bool:
        """Store ``value`` under ``key``, evicting entries per the policy until it fits.

        An existing entry for ``key`` is replaced: it is dropped first, and the new value counts as a
        fresh insertion (back of the FIFO/LRU order, one use for LFU). A value bigger than
        ``max_bytes`` is not stored and counts as rejected; the old entry for ``key``, if any, is still
        dropped. On a disabled cache (``max_bytes == 0``) this does nothing.

        Returns:
            True if the value was stored.

        Raises:
            TypeError: if ``value`` is not a supported structure (see :func:`value_nbytes`).
        """
        if self._max_bytes == 0:
            return False
        size = value_nbytes(value)
        self._remove(key)
        if size > self._max_bytes:
            self._rejected += 1
            return False
        self._evict_until(self._max_bytes - size)
        self._entries[key] = (value, size)
        self._bytes += size
        self._order.record_insert(key)
        return True

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is stored. Does not count as a hit or miss, nor change eviction order."""
        return key in self._entries

    def __len__(self) -> int:
        """Number of stored entries."""
        return len(self._entries)

    def clear(self) -> None:
        """Drop every entry. The hit, miss, eviction and rejection counters are kept."""
        self._entries.clear()
        self._order.clear()
        self._bytes = 0

    @property
    def stats(self) -> DiTCacheStats:
        """A snapshot of the counters and current occupancy."""
        return DiTCacheStats(
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            rejected=self._rejected,
            entries=len(self._entries),
            bytes=self._bytes,
            max_bytes=self._max_bytes,
        )

    def _remove(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[1]
            self._order.discard(key)

    def _evict_until(self, limit: int) -> None:
        while self._bytes > limit:
            key = self._order.pop_victim()
            self._bytes -= self._entries.pop(key)[1]
            self._evictions += 1
