"""Allocator and scheduler properties (issue 15), checked with hypothesis over the real PagePool,
KVBlocks, DeviceAdapterCache and Scheduler on a tiny model shape; no model weights are needed.

Random sequences of admissions (with and without adapters, including prompts that can never fit
beside their adapter), steps (KV growth, preemptions), aborts, adapter adds, deletes and replaces
while requests wait or run, evictions and finishes must never hand out a page twice, never lose
one, never make the scheduler raise, keep every pinned adapter pinned by running requests only,
keep a running request on the adapter weights it was first admitted with, fail a request only if
it cannot fit even alone, let no request be overtaken more than the affinity bound, and end with
the whole pool free (every request served: no starvation).

PrefixPoolMachine plays the same game with the prefix cache on (prompts share prefixes, and some
steps fail): its pages are a third owner, referenced exactly by the requests that hold them,
keyed by the tokens they hold under the adapter version of the request, never freed while
referenced, and gone once evicted.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Executor, Future

import numpy as np
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from slserve.adapters.peft_format import LoRAAdapter, LoRAWeights
from slserve.config import ModelConfig
from slserve.memory.adapter_pages import DeviceAdapterCache
from slserve.memory.adapter_store import AdapterNotFoundError
from slserve.memory.kv_cache import KVBlocks, kv_page_elems
from slserve.memory.pool import Owner, PagePool
from slserve.memory.prefix_cache import PrefixCache
from slserve.request import Request, Status
from slserve.sampling_params import SamplingParams
from slserve.scheduler.scheduler import Scheduler

MODEL = ModelConfig(
    vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
    head_dim=4, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=4096,
    tie_word_embeddings=True, qkv_bias=False, eos_token_ids=(0,), bos_token_id=None,
)
PAGE_TOKENS = 4
NUM_PAGES = 40
CAPACITY = NUM_PAGES * PAGE_TOKENS  # the engine's max_model_len bound
AFFINITY_BOUND = 2
NAMES = ["a", "b", "c"]
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (rank, modules): 4, 8 and 16 pages on all modules; 2 pages on q and v.
SHAPES = [(1, ALL), (2, ALL), (4, ALL), (2, ("q_proj", "v_proj"))]
# Prompts of the prefix-caching machine start with one of these (a few shared "system prompts").
SYSTEM_PROMPTS = [np.random.default_rng(i).integers(1, 32, CAPACITY).tolist() for i in range(3)]


def make_adapter(name: str, rank: int, modules: tuple[str, ...], seed: int) -> LoRAAdapter:
    g = torch.Generator().manual_seed(seed)
    shapes = MODEL.module_shapes()
    weights = {
        (layer, m): LoRAWeights(torch.randn(rank, shapes[m][0], generator=g),
                                torch.randn(shapes[m][1], rank, generator=g), 0.5)
        for layer in range(MODEL.num_layers) for m in modules
    }
    nbytes = sum(w.a.nbytes + w.b.nbytes for w in weights.values())
    return LoRAAdapter(name, weights, modules, dict.fromkeys(modules, rank), nbytes, {})


class InlineExecutor(Executor):
    """Runs host loads and copies at once, so that every example replays identically."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:
            fut.set_exception(e)
        return fut


class PoolMachine(RuleBasedStateMachine):
    PREFIX_CACHING = False

    def __init__(self) -> None:
        super().__init__()
        self.pool = PagePool(NUM_PAGES, kv_page_elems(MODEL, PAGE_TOKENS), itemsize=4)
        self.kv = KVBlocks(self.pool, PAGE_TOKENS)
        self.store: dict[str, LoRAAdapter] = {}
        self.prefix = PrefixCache(self.pool, PAGE_TOKENS) if self.PREFIX_CACHING else None
        self.cache = DeviceAdapterCache(self.pool, MODEL, self._get_host, executor=InlineExecutor(),
                                        spare=self.prefix)
        self.sched = Scheduler(self.kv, self.cache, max_num_seqs=4, max_num_batched_tokens=24,
                               affinity_bound=AFFINITY_BOUND, prefix_cache=self.prefix)
        self.live: list[Request] = []
        self.first_weights: dict[Request, LoRAAdapter] = {}
        self.seeds = itertools.count()
        self.ids = itertools.count()
        for name in NAMES[:2]:
            self.store[name] = make_adapter(name, *SHAPES[next(self.seeds) % len(SHAPES)], next(self.seeds))

    def _get_host(self, name: str) -> LoRAAdapter:
        adapter = self.store.get(name)
        if adapter is None:
            raise AdapterNotFoundError(f"adapter {name!r} not found")
        return adapter

    # -- rules ------------------------------------------------------------------------------------
    # Mostly short prompts that grow (pool pressure, preemptions), some up to the model's length.
    @rule(prompt=st.integers(1, 24) | st.integers(1, CAPACITY - 1), max_tokens=st.integers(1, 40),
          adapter=st.sampled_from([None, *NAMES]), system=st.integers(0, len(SYSTEM_PROMPTS)))
    def add_request(self, prompt: int, max_tokens: int, adapter: str | None, system: int) -> None:
        max_tokens = min(max_tokens, CAPACITY - prompt)
        if adapter is not None and adapter not in self.store:
            return  # the engine refuses it with a 404 before queueing
        ids = [1] * prompt
        if self.PREFIX_CACHING and system < len(SYSTEM_PROMPTS):
            ids = SYSTEM_PROMPTS[system][:prompt]
        req = Request(f"r{next(self.ids)}", ids, SamplingParams(max_tokens=max_tokens), adapter)
        self.sched.add(req)
        self.live.append(req)

    @rule(steps=st.integers(1, 4))
    def step(self, steps: int) -> None:
        for _ in range(steps):
            self._step()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data) -> None:
        req = data.draw(st.sampled_from(self.live))
        self.sched.finish(req)
        self.live.remove(req)

    @rule(name=st.sampled_from(NAMES), shape=st.sampled_from(SHAPES))
    def add_or_replace_adapter(self, name: str, shape: tuple) -> None:
        self.store[name] = make_adapter(name, *shape, next(self.seeds))
        self.cache.invalidate(name)

    @rule(name=st.sampled_from(NAMES))
    def delete_adapter(self, name: str) -> None:
        if self.store.pop(name, None) is not None:
            self.cache.invalidate(name)

    @rule(pages=st.integers(1, NUM_PAGES))
    def evict(self, pages: int) -> None:
        self.cache.evict_idle(pages)

    def _step(self) -> None:
        """What Engine.step does with the pool: schedule, prefetch, compute, sample, finish."""
        out = self.sched.schedule()
        if out.preempted:
            event("preemption")
        if any(r.num_preemptions and r.device_adapter and r.device_adapter.stale for r, _ in out.scheduled):
            event("readmitted on a stale adapter version")
        for req in out.failed:
            event(f"failed with {req.error_status}")
            self._check_failure(req)
            self.sched.finish(req)
            self.live.remove(req)
        queued = itertools.islice(self.sched.waiting, 16)
        self.cache.prefetch(list(dict.fromkeys(r.adapter for r in queued if r.adapter)),
                            keep_free_pages=len(self.sched.running) + 1)
        for req, n in out.scheduled:
            assert n > 0 and req.num_computed + n <= req.num_tokens
            assert len(req.block_table) == self.kv.pages_for(req.num_computed + n)
        self.sched.advance(out.scheduled)
        for req, _ in out.scheduled:
            if req.num_computed == req.num_tokens:
                req.token_ids.append(1)
                if req.num_output_tokens >= req.params.max_tokens:
                    self.sched.finish(req)
                    self.live.remove(req)

    def _check_failure(self, req: Request) -> None:
        """A request fails only when its adapter is gone, or when it cannot fit even alone."""
        assert req.finish_reason == "error" and req.error
        if req.error_status == 404:
            assert req.adapter is not None and req.adapter_version is None and req.adapter not in self.store
            return
        assert req.error_status == 400, req.error
        version = req.adapter_version
        adapter = version.adapter if version is not None else self.store.get(req.adapter)
        adapter_pages = self.cache.pages_needed(adapter) if adapter is not None else 0
        assert adapter_pages + self.kv.pages_for(req.num_tokens) > NUM_PAGES, req.error

    # -- invariants -------------------------------------------------------------------------------
    @invariant()
    def pages_are_owned_exactly_once(self) -> None:
        devs = [*self.cache.resident.values(), *self.cache.stale]
        kv = [p for r in self.live for p in r.block_table[len(r.cached_pages):]]
        adapter = [p for d in devs for s, n in d.runs for p in range(s, s + n)]
        prefix = self.prefix.owned_pages() if self.prefix is not None else []
        held = np.zeros(NUM_PAGES, dtype=int)
        for p in kv + adapter + prefix:
            assert 0 <= p < NUM_PAGES
            held[p] += 1
        assert held.max(initial=0) <= 1, "a page is handed out twice"
        assert (held == 1).tolist() == (~self.pool._free).tolist(), "a page is lost or wrongly free"
        assert self.pool.used(Owner.KV) == len(kv)
        assert self.pool.used(Owner.ADAPTER) == len(adapter) == sum(d.num_pages for d in devs)
        assert self.pool.used(Owner.PREFIX) == len(prefix)
        assert self.pool.num_free + len(kv) + len(adapter) + len(prefix) == NUM_PAGES

    @invariant()
    def pins_belong_to_running_requests(self) -> None:
        running = self.sched.running
        for dev in [*self.cache.resident.values(), *self.cache.stale]:
            assert dev.pins == sum(r.device_adapter is dev for r in running)
            if dev.stale:
                assert dev.pins > 0, "a stale adapter outlived its last user"
        for req in running:
            assert req.status is Status.RUNNING
            assert (req.device_adapter is not None) == (req.adapter is not None)
            if req.device_adapter is not None:
                first = self.first_weights.setdefault(req, req.device_adapter.adapter)
                assert req.device_adapter.adapter is first, "a running request changed adapter weights"
                assert req.device_adapter.runs, "pinned adapter without pages"
        for req in self.sched.waiting:
            assert req.status is Status.WAITING and req.device_adapter is None and not req.block_table
        assert {id(r) for r in (*running, *self.sched.waiting)} == {id(r) for r in self.live}

    @invariant()
    def no_request_overtaken_past_the_bound(self) -> None:
        for req in self.live:
            assert req.overtaken <= AFFINITY_BOUND
            if req.overtaken:
                event("overtaken")

    def teardown(self) -> None:
        # Finishing everything (by running it to completion) leaves the pool idle.
        for _ in range(2000):
            if not self.sched.has_work():
                break
            self._step()
            self.pages_are_owned_exactly_once()
            self.pins_belong_to_running_requests()
        assert not self.sched.has_work() and not self.live, "requests did not finish"
        assert not self.cache.stale
        if self.prefix is not None:
            self.prefix.clear()
            assert not self.prefix.owned_pages(), "a cached page outlived its last reference"
        self.cache.evict_idle(NUM_PAGES)
        assert self.pool.num_free == NUM_PAGES and not self.cache.resident


PoolMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPoolMachine = PoolMachine.TestCase


class PrefixPoolMachine(PoolMachine):
    PREFIX_CACHING = True

    @rule(n=st.integers(2, 4), prompt=st.integers(1, 60), max_tokens=st.integers(1, 20),
          adapter=st.sampled_from([None, *NAMES]), system=st.integers(0, len(SYSTEM_PROMPTS) - 1))
    def add_siblings(self, n: int, prompt: int, max_tokens: int, adapter: str | None, system: int) -> None:
        """n > 1: the same prompt n times (what the API queues for one request with n)."""
        for _ in range(n):
            self.add_request(prompt, max_tokens, adapter, system)

    @rule()
    def failed_step(self) -> None:
        """What Engine._fail_step does with the pool: the planned step's requests end, its pages
        leave the cache."""
        out = self.sched.schedule()
        for req in out.failed:
            self.sched.finish(req)
            self.live.remove(req)
        self.sched.step_failed()
        for req, _ in out.scheduled:
            self.sched.finish(req)
            self.live.remove(req)

    @rule()
    def clear_cache(self) -> None:
        self.prefix.clear()

    @invariant()
    def cached_pages_match_their_holders(self) -> None:
        refs: dict[int, int] = {}
        for req in self.live:
            chain = req.cached_pages
            assert [e.page for e in chain] == req.block_table[: len(chain)]
            if chain:
                assert chain[0].key[0] == self.sched._cache_root(req), "a page of another adapter version"
            for i, entry in enumerate(chain):
                assert entry.key[0] == (chain[i - 1].uid if i else self.sched._cache_root(req))
                assert entry.key[1] == tuple(req.token_ids[i * PAGE_TOKENS : (i + 1) * PAGE_TOKENS])
                refs[entry.page] = refs.get(entry.page, 0) + 1
        for page in self.prefix.owned_pages():
            assert self.prefix.refs(page) == refs.get(page, 0)
        if any(n > 1 for n in refs.values()):
            event("a cached page shared by running requests")


PrefixPoolMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPrefixPoolMachine = PrefixPoolMachine.TestCase
