"""The engine on rank 0: requests in, one planned forward per step, tokens out.

    add_request -> Scheduler.schedule -> build_plan -> ModelRunner.execute (every rank)
                -> Sampler (rank 0) -> Scheduler.append_token -> OutputProcessor -> StepOutput

Rank 0 keeps every decision and no model tensor of its own making: the scheduler, the page
allocator and the adapter residency books. The model runners (runner.py) hold the weights and
the pool storage; with tensor parallelism ranks 1..N-1 are worker processes (tp.py), with one
rank the runner is called in process. Single-threaded by design; the HTTP server drives it from
one engine thread (async_engine.py).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from pathlib import Path

import torch

from slserve.adapters.dora import BaseWeights
from slserve.adapters.nested import nested_rank_problem, split_nested
from slserve.adapters.peft_format import AdapterError
from slserve.config import EngineConfig
from slserve.kernels.cpu_ext import row_argmax_op
from slserve.memory.adapter_pages import DeviceAdapterCache
from slserve.memory.adapter_store import AdapterNotFoundError, AdapterStore
from slserve.memory.kv_cache import KVBlocks, kv_page_elems
from slserve.memory.pool import Owner, PagePool
from slserve.memory.prefix_cache import PrefixCache
from slserve.model.loader import load_model_config, load_tokenizer, model_id, resolve_model
from slserve.output_processor import OutputProcessor
from slserve.outputs import StepOutput
from slserve.parallel import Shard, check_tp
from slserve.plan import AdapterLoad, StepPlan, build_plan
from slserve.prompt_logprobs import add_rows as add_prompt_logprob_rows
from slserve.prompt_logprobs import record as record_prompt_logprobs
from slserve.request import Request
from slserve.runner import ModelRunner, runner_device
from slserve.sampling import Sampler
from slserve.sampling_params import SamplingParams
from slserve.scheduler.scheduler import Scheduler
from slserve.structured import GrammarError, Grammars
from slserve.tp import TPWorkers, WorkerFailure

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine refuses before queueing it (the HTTP layer maps it to 400/404)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        path = resolve_model(config.model)
        self.model_path: Path = path
        self.model_name = model_id(config.model)
        self.model_config = cfg = load_model_config(path)
        check_tp(cfg, config.tp)
        self.shard = shard = Shard(0, config.tp)
        if shard.parallel and not config.threads:  # the cores are shared by the ranks (tp.py)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // shard.size))
        self.device = runner_device(config, shard)
        self.tokenizer = load_tokenizer(path)
        local = shard.local_config(cfg)

        page_elems = kv_page_elems(local, config.page_tokens)
        itemsize = config.torch_dtype.itemsize
        num_pages = config.pool_bytes // (page_elems * itemsize)
        if num_pages < 2:
            raise ValueError(f"pool_bytes={config.pool_bytes} holds fewer than two pages of {page_elems}")
        self.pool = PagePool(num_pages, page_elems, itemsize)
        self.blocks = KVBlocks(self.pool, config.page_tokens)
        capacity = num_pages * config.page_tokens
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings,
                                 cfg.max_position_embeddings, capacity)

        t0 = time.perf_counter()
        self.workers: TPWorkers | None = None
        if shard.parallel:
            self.workers = TPWorkers(config, path, cfg, num_pages, self.device)
        try:
            self.runner = ModelRunner(config, path, cfg, shard, num_pages)
            if self.workers is not None:
                self.workers.wait_ready()
        except BaseException:
            if self.workers is not None:
                self.workers.close()
            raise
        logger.info("loaded %s (%s, quantization %s, tp=%d) in %.1fs; pool: %d pages of %d tokens "
                    "(%.2f GiB per rank)", self.model_name, config.dtype, config.quantization or "none",
                    config.tp, time.perf_counter() - t0, num_pages,
                    config.page_tokens, num_pages * page_elems * itemsize / 2**30)

        self.store = AdapterStore(config.adapter_path, cfg, config.max_lora_rank, config.host_cache_bytes,
                                  BaseWeights(path, cfg), config.torch_dtype)
        if config.preload_adapters:
            t0 = time.perf_counter()
            n = self.store.preload()
            logger.info("preloaded %d of %d adapters into host RAM in %.1fs", n, len(self.store),
                        time.perf_counter() - t0)
        self.prefix_cache = PrefixCache(self.pool, config.page_tokens) if config.prefix_caching else None
        self.adapter_cache = DeviceAdapterCache(self.pool, local, self.store.get,
                                                shapes=shard.lora_shapes(cfg), on_host=self.store.is_cached,
                                                page_tokens=config.page_tokens, spare=self.prefix_cache)
        self.scheduler = Scheduler(self.blocks, self.adapter_cache, config.max_num_seqs,
                                   config.max_num_batched_tokens, config.affinity_bound, self.prefix_cache)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        eos_ids = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        cpu_loops = config.cpu_extension and torch.device(config.device).type == "cpu"
        self.sampler = Sampler(config.seed, eos_ids, row_argmax_op() if cpu_loops else None)
        self.output_processor = OutputProcessor(self.tokenizer, eos_ids)
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()
        self.counters = {"steps": 0, "prompt_tokens": 0, "generated_tokens": 0, "preemptions": 0,
                         "failed_steps": 0, "step_adapters": 0, "step_adapter_bytes": 0}
        self.last_step_error: str | None = None  # "ExceptionType: message" of the last failed step

    # -- requests ----------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> Request:
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise RequestError("the prompt is empty", param="prompt")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must lie in [0, {vocab})", param="prompt")
        params.check_vocab(vocab)
        self._check_length(len(ids), params.max_tokens, 0, None)
        adapter, rank = self._resolve_adapter(adapter)
        if adapter is not None:
            self._check_length(len(ids), params.max_tokens, self._virtual_slots(adapter), adapter)
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.requests:
            raise RequestError(f"duplicate request id {rid}")
        req = Request(rid, ids, params, adapter, adapter_rank=rank)
        if params.structured_outputs is not None:
            try:
                req.matcher = self.grammars.matcher(params.structured_outputs)
            except GrammarError as e:
                raise RequestError(str(e), param="structured_outputs") from None
        self.requests[rid] = req
        self.scheduler.add(req)
        self.counters["prompt_tokens"] += len(ids)
        return req

    def _check_length(self, prompt: int, max_tokens: int, virtual: int, adapter: str | None) -> None:
        """Refuse a request whose sequence (the adapter's virtual slots, prompt, completion) is
        longer than max_model_len."""
        total = virtual + prompt + max_tokens
        if total <= self.max_model_len:
            return
        extra = f"{virtual} virtual tokens of adapter {adapter!r}, " if virtual else ""
        raise RequestError(
            f"This model's maximum context length is {self.max_model_len} tokens. However, you "
            f"requested {total} tokens ({extra}{prompt} in the prompt, "
            f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens" if virtual + prompt < self.max_model_len else "prompt",
        )

    def _virtual_slots(self, adapter: str) -> int:
        """Slots the adapter puts before a prompt (as its config declares them until it is parsed)."""
        try:
            return self.store.info(adapter).num_virtual
        except AdapterNotFoundError:
            return 0  # admission reports it

    @property
    def grammars(self) -> Grammars:
        """The structured-output compiler, built on first use (thread-safe once built; the HTTP
        server builds it through its first compile, on a worker thread)."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.model_config.vocab_size, sorted(self.eos_ids))
            return self._grammars

    def _resolve_adapter(self, model: str | None) -> tuple[str | None, int | None]:
        """(adapter name, nested rank or None) of a request's adapter (`name` or `name:rK`)."""
        if model is None or model in self.store:
            return model, None
        name, rank = split_nested(model)
        if rank is None or name not in self.store:
            raise RequestError(f"The model `{model}` does not exist.", status=404, param="model")
        try:
            info = self.store.info(name, parse=True)
        except AdapterNotFoundError:
            raise RequestError(f"The model `{model}` does not exist.", status=404, param="model") from None
        except AdapterError as exc:
            raise RequestError(f"adapter {name!r} could not be loaded: {exc}", param="model") from None
        problem = nested_rank_problem(name, info.kind, max(info.ranks.values(), default=0), rank)
        if problem is not None:
            raise RequestError(problem, param="model")
        return name, rank

    def abort(self, request_id: str) -> StepOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.finish(req)
        req.finish_reason = "abort"
        return self.output_processor.output(req, [], [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the step ----------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One step. A failure while planning, running the forward or sampling ends that step's
        requests (finish_reason "error", error_status 500) and the engine goes on. Anything raised
        from here (the scheduler's own books, a pool found inconsistent after a failed step, a
        tensor-parallel worker lost) means the engine's state cannot be trusted any more."""
        sched = self.scheduler.schedule()
        outputs = [self._finish(req, [], []) for req in sched.failed]
        self.counters["preemptions"] += len(sched.preempted)
        self.adapter_cache.prefetch(
            list(dict.fromkeys(r.adapter for r in itertools.islice(self.scheduler.waiting, 16) if r.adapter)),
            keep_free_pages=len(self.scheduler.running) + 1,
        )
        if not sched.scheduled:
            return outputs
        plan = None
        try:
            plan, sample = build_plan(sched.scheduled, self.config.page_tokens, self.model_config.hidden_size)
            self._count_adapters(sched.scheduled)
            prompt_spans = add_prompt_logprob_rows(plan, sched.scheduled)
            plan.adapter_commands = self.adapter_cache.take_commands()
            logits = self._execute(plan)
            if prompt_spans:  # the rows after the sampling ones
                record_prompt_logprobs(logits[len(sample):], prompt_spans)
                logits = logits[: len(sample)]
            self.scheduler.advance(sched.scheduled)
            sampled = []
            if sample:
                tokens, logprobs = self.sampler(logits, sample)
                sampled = zip(sample, tokens, logprobs, strict=True)
        except WorkerFailure:  # the ranks may be out of step: nothing can be trusted
            raise
        except Exception as exc:
            outputs += self._fail_step([req for req, _ in sched.scheduled], exc, plan)
            return outputs
        now = time.monotonic()
        for req, token, lp in sampled:
            try:
                outputs.append(self._append(req, token, lp, now))
            except Exception as exc:  # detokenizing or stop checks of this one request
                outputs += self._fail_step([req], exc)
        return outputs

    def _count_adapters(self, scheduled: list[tuple[Request, int]]) -> None:
        """Distinct adapters in the step and the bytes of their weights, which the step reads."""
        devs = {id(r.device_adapter): r.device_adapter for r, _ in scheduled if r.device_adapter}
        self.counters["step_adapters"] += len(devs)
        self.counters["step_adapter_bytes"] += sum(d.weight_elems for d in devs.values()) * self.pool.itemsize

    def _execute(self, plan: StepPlan):
        """Run the plan on every rank; the logits on rank 0."""
        self.counters["steps"] += 1
        if self.workers is None:
            return self.runner.execute(plan)
        self.workers.send(plan)
        try:
            return self.runner.execute(plan)
        except Exception as exc:
            self.workers.check()  # a worker's death is the cause worth reporting
            raise WorkerFailure(f"a tensor-parallel step failed on rank 0: {exc!r}") from exc
        finally:
            self.workers.step_done()

    def _fail_step(self, reqs: list[Request], exc: Exception,
                   plan: StepPlan | None = None) -> list[StepOutput]:
        """End `reqs` with a 500 error and free what they hold, forget the adapter copies the
        failed plan may have left half written, then check that the pool's books still balance
        (PoolCorrupted otherwise)."""
        what = f"{type(exc).__name__}: {exc}"
        logger.error("engine step failed for %d requests: %s", len(reqs), what, exc_info=exc)
        self.scheduler.step_failed()
        self.counters["failed_steps"] += 1
        self.last_step_error = what
        outputs = []
        for req in reqs:
            req.finish_reason = "error"
            req.error = f"the engine step failed ({what}); the request was ended"
            req.error_status = 500
            outputs.append(self._finish(req, [], []))
        if plan is not None:
            touched = {c.slot for c in plan.adapter_commands if isinstance(c, AdapterLoad)}
            self.adapter_cache.discard(touched | {s.slot for s in plan.segments})
        self.check_pool()
        return outputs

    def check_pool(self) -> None:
        """Raise PoolCorrupted unless the pages held by requests, adapters and the prefix cache match
        the allocator."""
        owned = {Owner.KV: self.scheduler.kv_pages(), Owner.ADAPTER: self.adapter_cache.owned_pages(),
                 Owner.PREFIX: self.prefix_cache.owned_pages() if self.prefix_cache is not None else []}
        self.pool.check(owned)

    def _append(self, req: Request, token: int, lp, now: float) -> StepOutput:
        self.scheduler.append_token(req, token, lp, now)
        self.counters["generated_tokens"] += 1
        req.finish_reason = self.output_processor.finish_reason(req, token)
        if req.finish_reason is not None:
            return self._finish(req, [token], [lp] if lp is not None else [])
        return self.output_processor.output(req, [token], [lp] if lp is not None else [])

    def _finish(self, req: Request, new_ids: list[int], new_lps) -> StepOutput:
        self.scheduler.finish(req)
        self.requests.pop(req.request_id, None)
        return self.output_processor.output(req, new_ids, new_lps)

    # -- adapters ----------------------------------------------------------------------------
    # The store is thread-safe; the server validates and writes uploads off the engine thread and
    # then calls invalidate_adapter on it, so that new requests never see a replaced device copy.
    def add_adapter(self, name: str, path: str | Path, replace: bool = False):
        info = self.store.add_from_path(name, Path(path), replace=replace)
        self.invalidate_adapter(name)
        return info

    def add_adapter_bytes(self, name: str, config: bytes, weights: bytes, replace: bool = False):
        info = self.store.add_from_bytes(name, config, weights, replace=replace)
        self.invalidate_adapter(name)
        return info

    def remove_adapter(self, name: str) -> None:
        if name not in self.store:
            raise AdapterNotFoundError(f"adapter {name!r} does not exist")
        self.store.remove(name)
        self.invalidate_adapter(name)

    def invalidate_adapter(self, name: str) -> None:
        """Drop the device copy of a replaced or deleted adapter (running users keep theirs)."""
        self.adapter_cache.invalidate(name)

    def adapters(self) -> list[str]:
        return self.store.names()

    def adapter_info(self, name: str):
        """(AdapterInfo, tier): the fastest tier holding it, "device", "host" or "disk"."""
        info = self.store.info(name)
        if name in self.adapter_cache.resident:
            return info, "device"
        return info, "host" if self.store.is_cached(name) else "disk"

    def reset_prefix_cache(self) -> int:
        """Evict every cached prefix page no request uses; the number of pages freed."""
        return self.prefix_cache.clear() if self.prefix_cache is not None else 0

    # -- stats -------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "pool": {**self.pool.stats(),
                     "pages_adapter_prefix": self.adapter_cache.snapshot()["prefix_pages"]},
            "prefix_cache": self.prefix_cache.snapshot() if self.prefix_cache is not None else None,
            "adapters": {"store": self.store.stats(), "device": self.adapter_cache.snapshot()},
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            **self.counters,
        }

    def close(self) -> None:
        self.adapter_cache.close()
        self.runner.close()
        if self.workers is not None:
            self.workers.close()
            self.workers = None


__all__ = ["Engine", "RequestError", "AdapterError"]
