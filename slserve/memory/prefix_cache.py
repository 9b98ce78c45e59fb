"""Automatic prefix caching (rank 0 books): full KV pages kept for reuse, the pool's third owner.

A page joins the cache as soon as a step is planned that fills it: the pool then counts it under
`Owner.PREFIX` instead of `Owner.KV`, and the request that computes it holds a reference. A later
request whose prompt starts with the same tokens, under the same adapter, references the same
pages (read-only) and computes only the rest; a request in the same step may too, since every
layer writes the step's K/V before it attends (so n > 1 siblings share their prompt's pages).
If that step fails, the pages it was to write leave the cache (`abandon`); once it ran, they are
ready for any later step (`commit`).

The key of a page is exact, a chain: (key of the page before it, its `page_tokens` token ids),
where the page before is named by its entry's unique id and the first page's parent is the
adapter's identity, `root`: (adapter name, version generation, nested rank), or () for the base
model. A replaced or deleted adapter gets a new generation (adapter_pages.py), so its new weights
never meet the old K/V. A request holds a chain from the first page on, so a page is referenced
at least as often as any page after it; pages nobody references wait in LRU order, deepest first,
and are evicted before idle adapters and before any preemption (scheduler.py).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from slserve.memory.pool import Owner, PagePool

Root = tuple  # (adapter name, generation, nested rank), or () for the base model


@dataclass(eq=False)
class CachedPage:
    page: int
    key: tuple  # (parent: Root or the parent entry's uid, token ids of the page)
    uid: int
    refs: int = 1
    pending: bool = True  # written by the step being planned: readable in that step only
    indexed: bool = True  # found by lookups; else freed with its last reference


@dataclass
class PrefixCacheStats:
    query_tokens: int = 0  # tokens of admitted requests (prompt, plus output after a preemption)
    hit_tokens: int = 0  # of those, tokens whose K/V came from the cache
    pages_added: int = 0
    evictions: int = 0


class PrefixCache:
    def __init__(self, pool: PagePool, page_tokens: int):
        self.pool = pool
        self.page_tokens = page_tokens
        self._index: dict[tuple, CachedPage] = {}
        self._held: dict[int, CachedPage] = {}  # page -> entry: every page the cache owns
        self._idle: OrderedDict[int, CachedPage] = OrderedDict()  # refs == 0, least recently used first
        self._pending: list[CachedPage] = []
        self._uids = itertools.count()
        self.stats = PrefixCacheStats()

    def _page_tokens(self, token_ids: Sequence[int], i: int) -> tuple[int, ...]:
        return tuple(token_ids[i * self.page_tokens : (i + 1) * self.page_tokens])

    def lookup(self, root: Root, token_ids: Sequence[int], max_pages: int) -> list[CachedPage]:
        """The cached chain of the longest matching prefix, at most max_pages long, referenced."""
        chain: list[CachedPage] = []
        parent: Root | int = root
        while len(chain) < max_pages:
            entry = self._index.get((parent, self._page_tokens(token_ids, len(chain))))
            if entry is None:
                break
            chain.append(entry)
            parent = entry.uid
        for entry in chain:
            if entry.refs == 0:
                del self._idle[entry.page]
            entry.refs += 1
        return chain

    def add(self, root: Root, chain: list[CachedPage], token_ids: Sequence[int], page: int) -> bool:
        """Hand page `len(chain)` of a sequence (a KV page of its request, planned to be filled this
        step) to the cache, referenced by that request, and append it to `chain`. False, and the page
        stays the request's own, if the cache holds that page already."""
        key = (chain[-1].uid if chain else root, self._page_tokens(token_ids, len(chain)))
        if key in self._index:
            return False
        self.pool.transfer([page], Owner.KV, Owner.PREFIX)
        entry = CachedPage(page, key, next(self._uids))
        self._index[key] = self._held[page] = entry
        self._pending.append(entry)
        chain.append(entry)
        self.stats.pages_added += 1
        return True

    def release(self, chain: list[CachedPage]) -> None:
        """Drop one reference to each page of a chain; the last one makes a page idle, deepest first."""
        for entry in reversed(chain):
            entry.refs -= 1
            if entry.refs > 0:
                continue
            if entry.pending or not entry.indexed:
                self._drop(entry)
            else:
                self._idle[entry.page] = entry
        chain.clear()

    def commit(self) -> None:
        """The planned step ran: its pages hold their K/V."""
        for entry in self._pending:
            entry.pending = False
        self._pending.clear()

    def abandon(self) -> None:
        """The planned step failed: its pages may be half written; no lookup finds them again."""
        for entry in self._pending:
            if entry.indexed:
                del self._index[entry.key]
                entry.indexed = False
            entry.pending = False
        self._pending.clear()

    def evict(self, pages: int) -> int:
        """Free up to `pages` pages nobody references, least recently used first; the number freed."""
        freed = 0
        while freed < pages and self._idle:
            _, entry = self._idle.popitem(last=False)
            self._drop(entry)
            self.stats.evictions += 1
            freed += 1
        return freed

    def clear(self) -> int:
        """Evict every page nobody references."""
        return self.evict(len(self._idle))

    def _drop(self, entry: CachedPage) -> None:
        if entry.indexed:
            del self._index[entry.key]
            entry.indexed = False
        del self._held[entry.page]
        self.pool.free([entry.page], Owner.PREFIX)

    @property
    def idle_pages(self) -> int:
        return len(self._idle)

    def owned_pages(self) -> list[int]:
        """Every page the cache owns, referenced or not (for invariant checks)."""
        return list(self._held)

    def refs(self, page: int) -> int:
        return self._held[page].refs

    def snapshot(self) -> dict[str, float]:
        s = self.stats
        return {
            "pages": len(self._held),
            "idle_pages": len(self._idle),
            "query_tokens": s.query_tokens,
            "hit_tokens": s.hit_tokens,
            "hit_rate": s.hit_tokens / s.query_tokens if s.query_tokens else 0.0,
            "pages_added": s.pages_added,
            "evictions": s.evictions,
        }
