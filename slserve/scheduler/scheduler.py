"""Continuous batching with one page budget for KV and adapters.

Every step: running requests first (a decode token each, or their next prefill chunk), in
admission order, then waiting requests while the token budget, the sequence limit and the pool
allow. Admission favours requests whose adapter costs no extra bytes in the step (base-model
requests, and adapters already in the running batch), then adapters already resident, then the
rest; among equals, first come first served. No request is overtaken by more than
`affinity_bound` later requests: one that was is admitted before anything behind it, so nothing
starves (0: strictly first come first served). An adapter still on disk is read and parsed on a
background thread; its request waits for that while a batch runs, rather than stall it. When a
running request needs a page and none is free, cached prefix pages nobody uses are evicted
first, then idle adapters; then the most recently admitted request is preempted (its pages
freed, recomputed later from its prompt and the tokens it already generated). Admission charges
the prompt chunk's KV pages and, when its adapter is not resident, the adapter's pages against
the same pool.

With a prefix cache (memory/prefix_cache.py), an admitted request first takes the cached pages
of its longest cached prefix under its adapter and computes only the rest, always at least its
last token (whose logits it samples from); a request asking for prompt logprobs needs every
prompt position's logits and skips the lookup. Every page a step fills joins the cache when
the step is planned.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass, field

from slserve.adapters.peft_format import AdapterError
from slserve.memory.adapter_pages import DeviceAdapterCache
from slserve.memory.adapter_store import AdapterNotFoundError
from slserve.memory.kv_cache import KVBlocks
from slserve.memory.pool import Owner
from slserve.memory.prefix_cache import PrefixCache, Root
from slserve.request import Request, Status
from slserve.scheduler.adapter_slots import seat, unseat

logger = logging.getLogger(__name__)

# How far down the queue admission looks for a cheaper request (bounds the work per admission).
AFFINITY_WINDOW = 256


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, new tokens)
    preempted: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)  # finished with an error (req.error, error_status)


class Scheduler:
    def __init__(
        self,
        kv: KVBlocks,
        adapters: DeviceAdapterCache | None,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        affinity_bound: int = 0,
        prefix_cache: PrefixCache | None = None,
    ):
        self.kv = kv
        self.adapters = adapters
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.affinity_bound = affinity_bound
        self.prefix_cache = prefix_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.seq_len - req.num_computed, budget)
            if self._grow(req, req.num_computed + n, out):
                self._cache_full_pages(req, req.num_computed + n)
                out.scheduled.append((req, n))
                budget -= n
                i += 1
            # else: req itself was preempted or failed and left self.running
        if not out.preempted:
            self._admit(budget, out)
        # Grouping tokens by adapter makes each adapter one contiguous LoRA segment.
        out.scheduled.sort(key=lambda rn: id(rn[0].device_adapter) if rn[0].device_adapter else 0)
        return out

    def _grow(self, req: Request, num_tokens: int, out: SchedulerOutput) -> bool:
        own = num_tokens - req.num_shared  # slots in its own pages (the rest in its adapter's)
        need = self.kv.pages_for(own) - len(req.block_table)
        while need > self.kv.pool.num_free:
            short = need - self.kv.pool.num_free
            if self._reclaim(short) > 0:
                continue
            victim = self.running[-1]
            if victim is req and len(self.running) == 1:
                self._fail(req, self._too_large(req, self.kv.pages_for(own)), 400, out)
                return False
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        self.kv.grow(req.block_table, own)
        return True

    def _reclaim(self, pages: int) -> int:
        """Free up to `pages` pages nobody uses: cached prefix pages first, then idle adapters."""
        freed = self.prefix_cache.evict(pages) if self.prefix_cache is not None else 0
        if freed < pages and self.adapters is not None:
            freed += self.adapters.evict_idle(pages - freed)
        return freed

    def _admit(self, budget: int, out: SchedulerOutput) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            pos = self._next_to_admit()
            req = self.waiting[pos]
            if (req.adapter is not None and req.device_adapter is None and self.running
                    and req.adapter_version is None and not self.adapters.ready(req.adapter)):
                break  # its files are being read and parsed in the background: the batch goes on
            n, pages = self._chunk(req, budget)
            if req.adapter is not None and req.device_adapter is None:
                try:
                    dev = self.adapters.acquire(req.adapter, reserve_pages=pages, version=req.adapter_version)
                except AdapterError as exc:
                    del self.waiting[pos]
                    self._fail(req, *self._adapter_failure(req, exc), out)
                    continue
                if dev is None:
                    # Nothing runs, so nothing is pinned: not even an empty pool holds both.
                    if not self.running:
                        del self.waiting[pos]
                        self._fail(req, self._too_large(req, pages), 400, out)
                        continue
                    self._release(req)
                    break
                req.device_adapter = dev
                if req.adapter_version is None:
                    req.adapter_version = dev.version
                seat(req, dev, self.kv.page_tokens)
            self._reuse_cached_prefix(req)
            n, pages = self._chunk(req, budget)
            if pages > self.kv.pool.num_free:
                self._reclaim(pages - self.kv.pool.num_free)
            if pages > self.kv.pool.num_free:
                if not self.running:
                    del self.waiting[pos]
                    self._fail(req, self._too_large(req, pages), 400, out)
                    continue
                self._release(req)  # only running requests pin adapters
                break
            del self.waiting[pos]
            for passed in itertools.islice(self.waiting, pos):
                passed.overtaken += 1
            self.kv.grow(req.block_table, req.num_computed + n - req.num_shared)
            if self._caches(req):
                self.prefix_cache.stats.query_tokens += req.num_tokens
                self.prefix_cache.stats.hit_tokens += req.num_computed
            self._cache_full_pages(req, req.num_computed + n)
            req.status = Status.RUNNING
            self.running.append(req)
            out.scheduled.append((req, n))
            budget -= n

    def _chunk(self, req: Request, budget: int) -> tuple[int, int]:
        """(slots to compute this step, own KV pages they need) of a request being admitted."""
        n = min(req.seq_len - req.num_computed, budget)
        return n, self.kv.pages_for(req.num_computed + n - req.num_shared) - len(req.block_table)

    # -- the prefix cache: a request's block table starts with its referenced cached pages -------
    def _caches(self, req: Request) -> bool:
        """Whether the request's pages go through the prefix cache. Not with slots its adapter
        puts before the prompt: those pages are keyed by the adapter alone (adapter_slots.py)."""
        return self.prefix_cache is not None and not req.num_virtual

    def _cache_root(self, req: Request) -> Root:
        """The identity of the weights the request runs with (the version it gets at admission)."""
        if req.adapter is None:
            return ()
        version = req.adapter_version
        generation = version.generation if version is not None else self.adapters.generation(req.adapter)
        return (req.adapter, generation, req.adapter_rank or 0)

    def _reuse_cached_prefix(self, req: Request) -> None:
        """Start a request being admitted on the cached pages of its longest cached prefix."""
        if not self._caches(req) or req.params.prompt_logprobs is not None or req.block_table:
            return
        max_pages = (req.num_tokens - 1) // self.kv.page_tokens  # the last token yields the logits
        chain = self.prefix_cache.lookup(self._cache_root(req), req.token_ids, max_pages)
        req.cached_pages = chain
        req.block_table.extend(entry.page for entry in chain)
        req.num_computed = len(chain) * self.kv.page_tokens

    def _cache_full_pages(self, req: Request, num_tokens: int) -> None:
        """Hand the pages that the first num_tokens tokens fill to the cache, up to the first one
        the cache holds already (which stays the request's own)."""
        if not self._caches(req):
            return
        root = self._cache_root(req)
        for i in range(len(req.cached_pages), num_tokens // self.kv.page_tokens):
            if not self.prefix_cache.add(root, req.cached_pages, req.token_ids, req.block_table[i]):
                break

    def _drop_pages(self, req: Request) -> None:
        """Let go of every page: references to cached ones, the request's own back to the pool."""
        shared = len(req.cached_pages)
        if shared:
            self.prefix_cache.release(req.cached_pages)
        self.kv.pool.free(req.block_table[shared:], Owner.KV)
        req.block_table.clear()

    def _next_to_admit(self) -> int:
        """The queue position to admit next: the earliest request of the lowest adapter cost
        among those up to (and including) the first one already overtaken `affinity_bound` times."""
        if self.affinity_bound == 0 or self.adapters is None:
            return 0
        best, best_cost = 0, 4
        for pos, req in enumerate(itertools.islice(self.waiting, AFFINITY_WINDOW)):
            cost = self._adapter_cost(req)
            if cost < best_cost:
                best, best_cost = pos, cost
            if cost == 0 or req.overtaken >= self.affinity_bound:
                break
        return best

    def _adapter_cost(self, req: Request) -> int:
        """0: no adapter bytes added to the step (base model, or an adapter the running batch
        already reads); 1: resident, not in the batch; 2: on the host, still to be copied in;
        3: still on disk."""
        if req.adapter is None:
            return 0
        dev = self.adapters.resident.get(req.adapter)
        if dev is None or dev.stale:
            return 2 if self.adapters.on_host(req.adapter) else 3
        return 0 if dev.pins else 1

    def _too_large(self, req: Request, kv_pages: int) -> str:
        """The message for a request that cannot fit even in an otherwise empty pool."""
        what = "the prompt" if req.adapter is None else f"the prompt and its adapter {req.adapter!r}"
        pages = kv_pages + self._adapter_pages(req)
        return (f"{what} do not fit in the KV pool ({pages} pages needed, {self.kv.pool.num_pages} in "
                f"the pool); use a shorter prompt or a smaller adapter")

    def _adapter_pages(self, req: Request) -> int:
        if req.adapter is None:
            return 0
        if req.device_adapter is not None:
            return req.device_adapter.num_pages
        version = req.adapter_version
        try:
            adapter = version.adapter if version is not None else self.adapters.get_host(req.adapter)
            return self.adapters.pages_needed(adapter)
        except AdapterError:
            return 0

    @staticmethod
    def _adapter_failure(req: Request, exc: AdapterError) -> tuple[str, int]:
        """(message, HTTP status) for a request whose adapter cannot be loaded at admission."""
        if isinstance(exc, AdapterNotFoundError):
            return f"adapter {req.adapter!r} was deleted before the request was admitted", 404
        return f"adapter {req.adapter!r} could not be loaded: {exc}", 400

    def _release(self, req: Request) -> None:
        self._drop_pages(req)
        unseat(req)
        req.num_computed = 0
        if req.device_adapter is not None:
            self.adapters.release(req.device_adapter)
            req.device_adapter = None

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        logger.debug("preempted %s (%d tokens to recompute)", req.request_id, req.num_tokens)

    def _fail(self, req: Request, message: str, status: int, out: SchedulerOutput) -> None:
        if req in self.running:
            self.running.remove(req)
        self._release(req)
        req.status = Status.FINISHED
        req.finish_reason = "error"
        req.error = message
        req.error_status = status
        out.failed.append(req)
        logger.info("request %s failed: %s", req.request_id, message)

    def advance(self, scheduled: list[tuple[Request, int]]) -> None:
        """The step ran: the scheduled tokens' K/V are in the cache."""
        for req, n in scheduled:
            req.num_computed += n
        if self.prefix_cache is not None:
            self.prefix_cache.commit()

    def step_failed(self) -> None:
        """The planned step did not run (or ran partly): the pages it filled are not cached."""
        if self.prefix_cache is not None:
            self.prefix_cache.abandon()

    def append_token(self, req: Request, token: int, logprob, now: float) -> None:
        req.token_ids.append(token)
        if logprob is not None:
            req.logprobs.append(logprob)
        if req.first_token_time is None:
            req.first_token_time = now

    def finish(self, req: Request) -> None:
        """Take a finished or aborted request out, wherever it is, and free what it holds."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
        req.status = Status.FINISHED

    def kv_pages(self) -> list[int]:
        """Every KV page a queued or running request holds as its own (for invariant checks)."""
        return [p for req in (*self.running, *self.waiting) for p in req.block_table[len(req.cached_pages):]]
