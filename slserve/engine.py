"""The engine: requests in, one scheduled forward per step, tokens out.

    add_request -> Scheduler.schedule -> build_batch -> LlamaModel.forward -> Sampler
                -> append tokens, detokenize, check stops -> StepOutput per request

Single-threaded by design; the HTTP server drives it from one engine thread (async_engine.py).
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

import torch

from slserve.adapters.peft_format import AdapterError
from slserve.batch import build_batch
from slserve.config import EngineConfig
from slserve.kernels import attention_backend, resolve_backend
from slserve.kernels.cpu_ext import layer_ops, lora_apply_op
from slserve.lora_batch import LoRABatch, TritonLoRABatch
from slserve.memory.adapter_pages import DeviceAdapterCache, group_columns
from slserve.memory.adapter_store import AdapterNotFoundError, AdapterStore
from slserve.memory.kv_cache import KVCache, kv_page_elems
from slserve.memory.pool import Owner, PagePool
from slserve.model.llama import LlamaModel
from slserve.model.loader import (
    load_model_config,
    load_state_dict,
    load_tokenizer,
    model_id,
    resolve_model,
)
from slserve.model.ops import TorchOps
from slserve.outputs import StepOutput
from slserve.request import Request, Status
from slserve.sampling import Sampler
from slserve.sampling_params import SamplingParams
from slserve.scheduler.scheduler import Scheduler

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
        if config.tp != 1:
            raise NotImplementedError("tensor parallelism (--tp > 1) is not available yet")
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = torch.device(config.device)
        self.backend = resolve_backend(config.kernel_backend, self.device)
        path = resolve_model(config.model)
        self.model_path: Path = path
        self.model_name = model_id(config.model)
        self.model_config = cfg = load_model_config(path)
        self.tokenizer = load_tokenizer(path)
        dtype = config.torch_dtype

        page_elems = kv_page_elems(cfg, config.page_tokens)
        num_pages = config.pool_bytes // (page_elems * dtype.itemsize)
        if num_pages < 2:
            raise ValueError(f"pool_bytes={config.pool_bytes} holds fewer than two pages of {page_elems}")
        self.pool = PagePool(num_pages, page_elems, dtype, self.device)
        self.kv = KVCache(self.pool, cfg, config.page_tokens)
        capacity = num_pages * config.page_tokens
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings,
                                 cfg.max_position_embeddings, capacity)

        t0 = time.perf_counter()
        state = load_state_dict(path, dtype)
        use_cpu_ext = config.cpu_extension and self.device.type == "cpu"
        ops = layer_ops() if use_cpu_ext else TorchOps()
        self.model = LlamaModel(cfg, state, self.device, cfg.max_position_embeddings, ops)
        del state
        logger.info("loaded %s (%s) in %.1fs; pool: %d pages of %d tokens (%.2f GiB)", self.model_name,
                    config.dtype, time.perf_counter() - t0, num_pages, config.page_tokens,
                    num_pages * page_elems * dtype.itemsize / 2**30)

        self.store = AdapterStore(config.adapter_path, cfg, config.max_lora_rank, config.host_cache_bytes)
        if config.preload_adapters:
            t0 = time.perf_counter()
            n = self.store.preload()
            logger.info("preloaded %d of %d adapters into host RAM in %.1fs", n, len(self.store),
                        time.perf_counter() - t0)
        self.adapter_cache = DeviceAdapterCache(self.pool, cfg, self.store.get)
        self.scheduler = Scheduler(self.kv, self.adapter_cache, config.max_num_seqs,
                                   config.max_num_batched_tokens)
        self.attention = attention_backend(self.backend, use_cpu_ext)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.eos_ids = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.sampler = Sampler(config.seed, self.eos_ids)
        self.counters = {"steps": 0, "prompt_tokens": 0, "generated_tokens": 0, "preemptions": 0,
                         "failed_steps": 0}
        self.last_step_error: str | None = None  # "ExceptionType: message" of the last failed step
        self._columns = group_columns(cfg)
        self._lora_op = lora_apply_op() if use_cpu_ext else None
        self._out_features = {m: s[1] for m, s in cfg.module_shapes().items()}

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
        if len(ids) + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {len(ids) + params.max_tokens} tokens ({len(ids)} in the prompt, "
                f"{params.max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                param="max_tokens" if len(ids) < self.max_model_len else "prompt",
            )
        if adapter is not None and adapter not in self.store:
            raise RequestError(f"The model `{adapter}` does not exist.", status=404, param="model")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.requests:
            raise RequestError(f"duplicate request id {rid}")
        req = Request(rid, ids, params, adapter)
        self.requests[rid] = req
        self.scheduler.add(req)
        self.counters["prompt_tokens"] += len(ids)
        return req

    def abort(self, request_id: str) -> StepOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.finish(req)
        req.finish_reason = "abort"
        return self._output(req, [], [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the step ----------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One step. A failure while building the batch, running the forward or sampling ends that
        step's requests (finish_reason "error", error_status 500) and the engine goes on. Anything
        raised from here (the scheduler's own books, or a pool found inconsistent after a failed
        step) means the engine's state cannot be trusted any more."""
        sched = self.scheduler.schedule()
        outputs = [self._finish(req, [], []) for req in sched.failed]
        self.counters["preemptions"] += len(sched.preempted)
        self.adapter_cache.prefetch(
            list(dict.fromkeys(r.adapter for r in itertools.islice(self.scheduler.waiting, 16) if r.adapter)),
            keep_free_pages=len(self.scheduler.running) + 1,
        )
        if not sched.scheduled:
            return outputs
        try:
            sampled = self._run_batch(sched.scheduled)
        except Exception as exc:
            outputs += self._fail_step([req for req, _ in sched.scheduled], exc)
            return outputs
        now = time.monotonic()
        for req, token, lp in sampled:
            try:
                outputs.append(self._append(req, token, lp, now))
            except Exception as exc:  # detokenizing or stop checks of this one request
                outputs += self._fail_step([req], exc)
        return outputs

    def _run_batch(self, scheduled: list[tuple[Request, int]]) -> list[tuple[Request, int, object]]:
        """Forward the scheduled tokens; (request, token, logprob) for each request that samples."""
        batch = build_batch(scheduled, self.config.page_tokens, self.device, self.backend, self._make_lora)
        logits = self.model(batch, self.kv, self.attention)
        self.counters["steps"] += 1
        for req, n in scheduled:
            req.num_computed += n
        if not batch.sample_requests:
            return []
        tokens, logprobs = self.sampler(logits, batch.sample_requests)
        return list(zip(batch.sample_requests, tokens, logprobs, strict=True))

    def _fail_step(self, reqs: list[Request], exc: Exception) -> list[StepOutput]:
        """End `reqs` with a 500 error and free what they hold, then check that the pool's books
        still balance (PoolCorrupted otherwise)."""
        what = f"{type(exc).__name__}: {exc}"
        logger.error("engine step failed for %d requests: %s", len(reqs), what, exc_info=exc)
        self.counters["failed_steps"] += 1
        self.last_step_error = what
        outputs = []
        for req in reqs:
            req.finish_reason = "error"
            req.error = f"the engine step failed ({what}); the request was ended"
            req.error_status = 500
            outputs.append(self._finish(req, [], []))
        self.check_pool()
        return outputs

    def check_pool(self) -> None:
        """Raise PoolCorrupted unless the pages held by requests and adapters match the allocator."""
        owned = {Owner.KV: self.scheduler.kv_pages(), Owner.ADAPTER: self.adapter_cache.owned_pages()}
        self.pool.check(owned)

    def _make_lora(self, segments):
        if self.backend == "triton":
            return TritonLoRABatch(segments, self.pool.flat, self._columns, self._out_features)
        return LoRABatch(segments, self.pool.flat, self._lora_op)

    def _append(self, req: Request, token: int, lp, now: float) -> StepOutput:
        req.token_ids.append(token)
        if lp is not None:
            req.logprobs.append(lp)
        if req.first_token_time is None:
            req.first_token_time = now
        self.counters["generated_tokens"] += 1
        params = req.params
        self._detokenize(req)
        if (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            req.finish_reason = "stop"
        elif params.stop and req.num_output_tokens > params.min_tokens and self._check_stop_strings(req):
            req.finish_reason = "stop"
        elif req.num_output_tokens >= params.max_tokens:
            req.finish_reason = "length"
        if req.finish_reason is not None:
            return self._finish(req, [token], [lp] if lp is not None else [])
        return self._output(req, [token], [lp] if lp is not None else [])

    def _finish(self, req: Request, new_ids: list[int], new_lps) -> StepOutput:
        self.scheduler.finish(req)
        self.requests.pop(req.request_id, None)
        return self._output(req, new_ids, new_lps)

    def _output(self, req: Request, new_ids: list[int], new_lps) -> StepOutput:
        finished = req.status is Status.FINISHED
        # Hold back text that could still turn into a stop string.
        hold = 0 if finished or not req.params.stop else max(len(s) for s in req.params.stop) - 1
        end = max(req.emitted_text_len, len(req.text) - hold)
        delta = req.text[req.emitted_text_len : end]
        req.emitted_text_len = end
        return StepOutput(
            request_id=req.request_id,
            new_token_ids=new_ids,
            new_text=delta,
            finished=finished,
            finish_reason=req.finish_reason if finished else None,
            num_prompt_tokens=req.num_prompt_tokens,
            num_generated_tokens=req.num_output_tokens,
            new_logprobs=list(new_lps),
            error=req.error,
            error_status=req.error_status,
        )

    def _detokenize(self, req: Request) -> None:
        """Incremental detokenization: decode a short window so that multi-token characters and
        leading spaces come out right without re-decoding the whole output every step."""
        ids = req.token_ids
        if ids[-1] in self.eos_ids and not req.params.ignore_eos:
            return
        decode = self.tokenizer.decode
        prefix = decode(ids[req.prefix_offset : req.read_offset], skip_special_tokens=True)
        full = decode(ids[req.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            req.text += full[len(prefix) :]
            req.prefix_offset = req.read_offset
            req.read_offset = len(ids)

    def _check_stop_strings(self, req: Request) -> bool:
        longest = max(len(s) for s in req.params.stop)
        window_start = max(0, req.emitted_text_len - longest)
        hits = [(req.text.find(s, window_start), s) for s in req.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        i, s = min(hits)
        req.text = req.text[: i + len(s)] if req.params.include_stop_str_in_output else req.text[:i]
        return True

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

    # -- stats -------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "pool": self.pool.stats(),
            "adapters": {"store": self.store.stats(), "device": self.adapter_cache.snapshot()},
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            **self.counters,
        }

    def close(self) -> None:
        self.adapter_cache.close()


__all__ = ["Engine", "RequestError", "AdapterError"]
