"""The OpenAI-compatible HTTP server: FastAPI in front of one AsyncEngine.

    POST /v1/completions, /v1/chat/completions     OpenAI, streaming (SSE) or not
    GET  /v1/models                                the base model and every adapter
    POST /v1/adapters (multipart), GET /v1/adapters[/{name}], DELETE /v1/adapters/{name}
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter   vLLM's adapter routes
    POST /tokenize, /detokenize                    vLLM's tokenizer routes
    GET  /health, /metrics                         readiness, Prometheus

The event loop validates and formats; prompts are tokenized on a small worker pool (a long
prompt takes seconds and must not stall every other request); the engine thread only steps. A
request's `model` names an adapter, or the base model for none.

SIGTERM or SIGINT drains (`Drain`): new requests get 503, those already received finish until
`drain_timeout`, then the rest end with an OpenAI error, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from types import FrameType
from typing import Any, TypeVar

import uvicorn
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Receive, Scope, Send

from slserve.adapters.nested import split_nested
from slserve.api import protocol as p
from slserve.api.errors import APIError, error_body, install_error_handlers, to_api_error
from slserve.api.metrics import RequestCounter, ServerMetrics, TokenTimer
from slserve.api.tools import ToolPlan, finish_reason, parse_output, template_reads_tools
from slserve.async_engine import AsyncEngine, GenerateItem, RequestStream
from slserve.config import EngineConfig
from slserve.outputs import StepOutput, TokenLogprob
from slserve.sampling_params import StructuredOutputsParams
from slserve.structured import GrammarError

logger = logging.getLogger(__name__)

T = TypeVar("T")
# multipart framing around the two files and the name; the files themselves get max_upload_bytes
_MULTIPART_SLACK = 64 << 10
# Tokenizer threads: enough to overlap two large requests, few enough to leave the engine its cores.
_TOKENIZE_THREADS = 2
# After the drain deadline, how long the ended requests get to write their error responses.
_END_GRACE_S = 5.0
# Open during a drain: a load balancer must see the 503 of /health, Prometheus the last scrape.
_ALWAYS_OPEN = ("/health", "/metrics")


# -- auth ---------------------------------------------------------------------------------------


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _same(a: str | None, b: str) -> bool:
    return a is not None and hmac.compare_digest(a.encode(), b.encode())


def _auth_dependencies(api_key: str | None, admin_key: str | None):
    """(dependency for /v1 routes, dependency for adapter write routes).

    With an api key every /v1 route needs it (or the admin key); with an admin key the write
    routes need exactly the admin key: a valid api key there is 403, anything else 401.
    """

    async def user(request: Request) -> None:
        if api_key is None:
            return
        token = _bearer(request)
        if not (_same(token, api_key) or (admin_key is not None and _same(token, admin_key))):
            raise APIError(401, "missing or invalid API key (send Authorization: Bearer <key>)")

    async def admin(request: Request) -> None:
        if admin_key is None:
            await user(request)
            return
        token = _bearer(request)
        if _same(token, admin_key):
            return
        if api_key is not None and _same(token, api_key):
            raise APIError(403, "this route needs the admin key")
        raise APIError(401, "missing or invalid admin key (send Authorization: Bearer <key>)")

    return Depends(user), Depends(admin)


# -- helpers ------------------------------------------------------------------------------------


class _SSEResponse(StreamingResponse):
    """Server-sent events that always close their request stream when the response ends, so that
    a client that goes away mid-stream (or before the first chunk) aborts its engine requests at
    once, not whenever the generator happens to be collected."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], stream: RequestStream) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache"})
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self._stream.close()


def _sse(payload: str) -> str:
    return f"data: {payload}\n\n"


_SSE_DONE = "data: [DONE]\n\n"


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T | Response:
    """Run `work`, cancelling it if the client disconnects first (its requests get aborted)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return Response(status_code=499)  # nobody reads it


class _UploadTooLarge(Exception):
    pass


async def _bounded(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise _UploadTooLarge
        yield chunk



def _prompt_only(out: StepOutput) -> StepOutput:
    """The output of a completion that only scores its prompt (`max_tokens` 0 with `echo`; the
    engine generates one token, which nobody sees): no new text, tokens or logprobs, and a normal
    finish is "length", the zero tokens asked for."""
    finish = "length" if out.finish_reason in ("stop", "length") else out.finish_reason
    return replace(out, new_token_ids=[], new_text="", new_logprobs=[], num_generated_tokens=0,
                   finish_reason=finish)


async def _collect(stream: RequestStream, timers: list[TokenTimer], prompt_only: bool = False):
    """Drain a non-streaming request: per choice its text pieces, logprobs, prompt logprobs (None
    unless asked for) and final output (see `_prompt_only`)."""
    texts: list[list[str]] = [[] for _ in timers]
    lps: list[list[TokenLogprob]] = [[] for _ in timers]
    prompt_lps: list[list[TokenLogprob | None] | None] = [None] * len(timers)
    finals: list[StepOutput | None] = [None] * len(timers)
    async with stream:
        async for k, out in stream:
            if prompt_only:
                out = _prompt_only(out)
            timers[k].tokens(len(out.new_token_ids))
            texts[k].append(out.new_text)
            lps[k].extend(out.new_logprobs)
            if out.prompt_logprobs is not None:
                prompt_lps[k] = out.prompt_logprobs
            if out.finished:
                timers[k].finish()
                finals[k] = out
                if (err := _finish_error(out)) is not None:
                    raise err
    return texts, lps, prompt_lps, finals

# error_status of a request the engine ended with an error -> its OpenAI error code
_FINISH_ERROR_CODES = {400: "request_does_not_fit", 404: "model_not_found", 500: "engine_step_failed"}


def _finish_error(out: StepOutput) -> APIError | None:
    """A request the engine ended without a normal finish (adapter gone, pool too small, failed step),
    with the status the engine gave it."""
    if out.finish_reason in ("stop", "length"):
        return None
    status = out.error_status or 500
    return APIError(status, out.error or f"the request ended with {out.finish_reason!r}",
                    code=_FINISH_ERROR_CODES.get(status, "request_failed"))


def _encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """tokenizer.encode(text), through the Rust tokenizer itself where there is one. Its
    `encode_batch` releases the GIL while it encodes; its single `encode` was seen holding it for
    the whole encode inside the server (4 s for 2 MB, with /health waiting as long), and the
    transformers wrapper holds it for ~0.6 s per 2 MB building its BatchEncoding."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids


class _TokenText:
    """Token strings for logprobs, cached: decoding one token is the same every time."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            s = self._cache[token_id] = self._tokenizer.decode([token_id])
        return s


class _CompletionLogprobBuilder:
    """The legacy logprobs object; text_offset counts from the start of the completion (of the
    echoed prompt with `echo`)."""

    def __init__(self, text: _TokenText) -> None:
        self.text = text
        self.offset = 0

    def __call__(self, lps: list[TokenLogprob], prompt: _Echo | None = None) -> p.CompletionLogprobs:
        """The entries of `lps`, after those of the echoed prompt's tokens when `prompt` is given
        (the first one null, as OpenAI has it)."""
        out = p.CompletionLogprobs()
        if prompt is not None:
            prompt_lps = prompt.logprobs if prompt.logprobs is not None else [None] * len(prompt.ids)
            for token_id, lp in zip(prompt.ids, prompt_lps, strict=True):
                token = self.text(token_id)
                out.tokens.append(token)
                out.token_logprobs.append(None if lp is None else lp.logprob)
                out.top_logprobs.append(None if lp is None else self._top(token, lp))
                out.text_offset.append(self.offset)
                self.offset += len(token)
        for lp in lps:
            token = self.text(lp.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append(self._top(token, lp))
            out.text_offset.append(self.offset)
            self.offset += len(token)
        return out

    def _top(self, token: str, lp: TokenLogprob) -> dict[str, float]:
        top = {self.text(t): v for t, v in lp.top}
        top.setdefault(token, lp.logprob)
        return top


@dataclass
class _Echo:
    """A completion's echoed prompt: its text and token ids, and the engine's prompt logprobs
    once they arrive (with `logprobs`)."""

    text: str
    ids: list[int]
    logprobs: list[TokenLogprob | None] | None = None


class _CompletionChoices:
    """Builds a completion's choices, whole or as stream deltas: the echoed prompt and the prompt
    logprobs go into each choice's first piece."""

    def __init__(self, body: p.CompletionRequest, num_choices: int, token_text: _TokenText,
                 echoes: list[_Echo] | None) -> None:
        self.token_text = token_text
        self.echoes = echoes
        self.builders = None
        if body.logprobs is not None:
            self.builders = [_CompletionLogprobBuilder(token_text) for _ in range(num_choices)]
        self.want_prompt_logprobs = body.prompt_logprobs is not None
        self.started: set[int] = set()

    def needs_first_piece(self, k: int) -> bool:
        """Whether choice k still has its echo or prompt logprobs to send."""
        return k not in self.started and (self.echoes is not None or self.want_prompt_logprobs)

    def __call__(self, k: int, text: str, finish_reason: str | None, lps: list[TokenLogprob],
                 prompt_lps: list[TokenLogprob | None] | None) -> p.CompletionChoice:
        first = k not in self.started
        self.started.add(k)
        echo = self.echoes[k] if self.echoes is not None and first else None
        if echo is not None:
            echo.logprobs = prompt_lps
            text = echo.text + text
        return p.CompletionChoice(
            index=k, text=text, finish_reason=finish_reason,
            logprobs=self.builders[k](lps, echo) if self.builders else None,
            prompt_logprobs=(_prompt_logprobs(self.token_text, prompt_lps)
                             if first and self.want_prompt_logprobs else None))


def _prompt_logprobs(text: _TokenText, lps: list[TokenLogprob | None] | None) -> p.PromptLogprobs | None:
    """vLLM's prompt_logprobs: per prompt token None (the first) or {token id: logprob, rank,
    decoded token}, holding the token itself and the top k."""
    if lps is None:
        return None
    out: p.PromptLogprobs = []
    for lp in lps:
        if lp is None:
            out.append(None)
            continue
        entry = {str(lp.token_id): p.PromptLogprob(logprob=lp.logprob, rank=lp.rank,
                                                   decoded_token=text(lp.token_id))}
        for rank, (t, v) in enumerate(lp.top, 1):
            entry.setdefault(str(t), p.PromptLogprob(logprob=v, rank=rank, decoded_token=text(t)))
        out.append(entry)
    return out


def _chat_logprobs(text: _TokenText, lps: list[TokenLogprob]) -> p.ChatLogprobs:
    content = []
    for lp in lps:
        token = text(lp.token_id)
        top = [p.TopLogprob(token=(s := text(t)), logprob=v, bytes=list(s.encode())) for t, v in lp.top]
        content.append(p.ChatTokenLogprob(token=token, logprob=lp.logprob, bytes=list(token.encode()),
                                          top_logprobs=top))
    return p.ChatLogprobs(content=content)


# The upload body is parsed by hand (bounded streaming), so FastAPI cannot describe it; clients and
# schema fuzzers read it from here.
_UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object",
    "required": ["name", "config", "weights"],
    "properties": {
        "name": {"type": "string", "description": "adapter name: [A-Za-z0-9._-], at most 64 characters"},
        "config": {"type": "string", "format": "binary", "description": "adapter_config.json"},
        "weights": {"type": "string", "format": "binary", "description": "adapter_model.safetensors"},
        "replace": {"type": "string", "description": "true: overwrite an adapter of that name"},
    },
}}}}}


# -- graceful stop ------------------------------------------------------------------------------


class Drain:
    """Graceful stop. Its gate (`_DrainGate`) counts the requests in flight and, once `run` began,
    answers every new one but /health and /metrics with 503 (OpenAI format, `Connection: close`);
    `run` waits for the in-flight requests up to a deadline, then ends the rest with an error
    (a 503 body, or an SSE error event and [DONE] for a stream) and waits for those answers to go
    out."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.inflight = 0
        self._hurry = asyncio.Event()

    async def gate(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _ALWAYS_OPEN:
            await app(scope, receive, send)
            return
        if self.engine.draining:
            body = error_body(503, self.engine.not_ready_reason())
            await JSONResponse(body, 503, headers={"Connection": "close"})(scope, receive, send)
            return
        self.inflight += 1
        try:
            await app(scope, receive, send)
        finally:
            self.inflight -= 1

    def hurry(self) -> None:
        """Stop waiting for the in-flight requests (a second signal)."""
        self._hurry.set()

    async def run(self, timeout: float) -> None:
        self.engine.begin_drain()
        logger.info("draining: %d request(s) in flight, up to %.1f s", self.inflight, timeout)
        await self._wait_idle(timeout)
        if self.inflight:
            ended = await self.engine.end_requests(
                f"the server is shutting down; the request did not finish in the drain time ({timeout:g} s)")
            logger.warning("drain time over: ended %d engine request(s) of %d HTTP request(s)",
                           ended, self.inflight)
            self._hurry.clear()
            await self._wait_idle(_END_GRACE_S)
        logger.info("drained")

    async def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.inflight and not self._hurry.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), 0.05)


class _DrainGate:
    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.drain.gate(self.app, scope, receive, send)


# -- the app ------------------------------------------------------------------------------------


def create_app(
    engine: AsyncEngine,
    api_key: str | None = None,
    admin_key: str | None = None,
    on_fatal: Callable[[], None] | None = None,
) -> FastAPI:
    """The FastAPI app. Its lifespan starts the engine thread (if not started) and stops it;
    `app.state.drain` is its graceful stop (see `Drain`)."""
    metrics = ServerMetrics()
    drain = Drain(engine)
    tokenize_pool = ThreadPoolExecutor(_TOKENIZE_THREADS, thread_name_prefix="slserve-tokenize")
    # Grammars compile on their own thread (xgrammar releases the GIL meanwhile): a spec that takes
    # seconds (a regex like `.{1,30000}`) then delays only other structured requests' compiles,
    # never the tokenizing of every request.
    grammar_pool = ThreadPoolExecutor(1, thread_name_prefix="slserve-grammar")

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if not engine.started:
            engine.start(asyncio.get_running_loop())
        watch = asyncio.ensure_future(_watch_startup())
        try:
            yield
        finally:
            watch.cancel()
            tokenize_pool.shutdown(wait=False, cancel_futures=True)
            grammar_pool.shutdown(wait=False, cancel_futures=True)
            await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    async def _watch_startup() -> None:
        if not await engine.wait_ready():
            logger.error("%s", engine.not_ready_reason())
            if on_fatal is not None:
                on_fatal()

    app = FastAPI(title="slserve", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.drain = drain
    install_error_handlers(app)
    app.add_middleware(_DrainGate, drain=drain)
    app.add_middleware(RequestCounter, metrics=metrics)  # outermost: counts the drain's 503s too
    user, admin = _auth_dependencies(api_key, admin_key)
    cfg = engine.config

    def base_name() -> str:
        return engine.engine.model_name

    def adapter_of(model: str | None) -> str | None:
        if model is None or model == base_name() or (cfg.model is not None and model == cfg.model):
            return None
        return model

    async def off_loop(fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-heavy work (tokenizing megabytes) on the tokenizer pool (see `_encode`)."""
        return await asyncio.get_running_loop().run_in_executor(tokenize_pool, fn, *args)

    def tokenize_all(prompts: list[str | list[int]], add_special_tokens: bool = True) -> list[list[int]]:
        tokenizer = engine.engine.tokenizer
        return [_encode(tokenizer, x, add_special_tokens) if isinstance(x, str) else x for x in prompts]

    def tool_plan(body: p.ChatCompletionRequest | p.TokenizeChatRequest) -> ToolPlan:
        return body.tool_plan(template_reads_tools(engine.engine.tokenizer))

    def chat_ids(body: p.ChatCompletionRequest | p.TokenizeChatRequest, plan: ToolPlan) -> list[int]:
        tokenizer = engine.engine.tokenizer
        try:
            text = tokenizer.apply_chat_template(
                body.template_messages(plan), tools=plan.template_tools(), tokenize=False,
                add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message)
        except APIError:
            raise
        except Exception as e:  # a template that rejects the conversation (roles, order)
            raise APIError(400, f"the chat template failed: {e}", "messages") from None
        return _encode(tokenizer, text, add_special_tokens=body.add_special_tokens)

    def vocab_size() -> int:
        return engine.engine.model_config.vocab_size

    async def structured_outputs(so: StructuredOutputsParams | None, param: str | None
                                 ) -> StructuredOutputsParams | None:
        """A request's output constraint (`output_constraint()`), compiled here (off the loop,
        into the engine's cache) so that a spec that cannot compile is a 400 naming `param` before
        anything is queued."""
        if so is not None:
            try:
                # the first call also builds the compiler (seconds): off the loop as well
                await asyncio.get_running_loop().run_in_executor(
                    grammar_pool, lambda: engine.engine.grammars.compile(so))
            except GrammarError as e:
                raise APIError(400, f"{param}: {e}", param) from None
        return so

    def check_model(model: str | None) -> None:
        """404 for a `model` that names neither the base model nor an adapter, for routes that do
        not go through the engine (which checks it itself)."""
        adapter = adapter_of(model)
        if adapter is not None and split_nested(adapter)[0] not in engine.engine.store:
            raise APIError(404, f"The model `{adapter}` does not exist.", "model", "model_not_found")

    def check_length(num_prompt_tokens: int, max_tokens: int) -> None:
        """The engine's context-length check, done here so that a prompt of a million tokens is
        refused at once instead of being copied and scanned on the engine thread (seconds of GIL
        there, which stall the event loop too)."""
        max_model_len = engine.engine.max_model_len
        if num_prompt_tokens + max_tokens > max_model_len:
            raise APIError(
                400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, "
                f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                "max_tokens" if num_prompt_tokens < max_model_len else "prompt")

    # -- ops --------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if engine.fatal is not None:  # the process is about to exit; a supervisor restarts it
            return JSONResponse(error_body(503, engine.not_ready_reason(), code="engine_dead"), 503)
        if not engine.ready:
            return JSONResponse(error_body(503, engine.not_ready_reason()), 503)
        # Plain attribute reads: /health never waits for the engine thread.
        e = engine.engine
        body: dict[str, Any] = {"status": "ok", "failed_steps": e.counters["failed_steps"]}
        if e.last_step_error is not None:
            body["last_step_error"] = e.last_step_error
        return JSONResponse(body)

    @app.get("/metrics")
    async def prometheus() -> Response:
        stats = await engine.stats() if engine.running else None
        return Response(metrics.render(stats), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- models -----------------------------------------------------------------------------------
    @app.get("/v1/models", dependencies=[user])
    async def models() -> p.ModelList:
        base = base_name()
        infos = await engine.call(lambda e: [e.adapter_info(n)[0] for n in e.adapters()])
        created = int(engine.started_at)
        cards = [p.ModelCard(id=base, created=created, root=cfg.model or base,
                             max_model_len=engine.engine.max_model_len)]
        cards += [p.ModelCard(id=i.name, created=int(i.created), root=i.name, parent=base, kind=i.kind,
                              ranks=i.ranks, virtual_tokens=i.num_virtual or None,
                              target_modules=list(i.target_modules) if i.target_modules else None)
                  for i in infos]
        return p.ModelList(data=cards)

    # -- completions ------------------------------------------------------------------------------
    @app.post("/v1/completions", dependencies=[user])
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        body.check()
        adapter = adapter_of(body.model)
        prompts = await off_loop(tokenize_all, body.prompts(), body.add_special_tokens)
        structured = await structured_outputs(*body.output_constraint())
        max_model_len = engine.engine.max_model_len
        rid = body.response_id("cmpl")
        items = []
        for i, ids in enumerate(prompts):
            max_tokens = body.max_tokens if body.max_tokens is not None else max(1, max_model_len - len(ids))
            if max_tokens == 0:  # (with echo) scores the prompt: the engine generates one token, unseen
                max_tokens = 1
            choices = body.sampling_params(max_tokens, body.engine_logprobs, vocab_size(), structured)
            for j, params in enumerate(choices):
                items.append(GenerateItem(f"{rid}-{i}-{j}", ids, params, adapter))
            check_length(len(ids), max_tokens)
        model = body.model or base_name()
        echoes = None
        if body.echo:  # a text prompt as sent, token ids decoded
            texts = await off_loop(lambda: [x if isinstance(x, str) else engine.engine.tokenizer.decode(x)
                                            for x in body.prompts()])
            echoes = [_Echo(texts[i], ids) for i, ids in enumerate(prompts)
                      for _ in range(body.num_candidates)]
        choices = _CompletionChoices(body, len(items), _TokenText(engine.engine.tokenizer), echoes)
        stream = await engine.submit(items)
        timers = [TokenTimer(metrics, t0) for _ in items]
        if body.stream:
            events = _completion_events(stream, rid, model, len(prompts), body, timers, choices)
            return _SSEResponse(events, stream)
        return await _until_disconnect(
            request, _completion_response(stream, rid, model, len(prompts), body, timers, choices)
        )

    async def _completion_response(stream: RequestStream, rid: str, model: str, num_prompts: int,
                                   body: p.CompletionRequest, timers: list[TokenTimer],
                                   make_choice: _CompletionChoices) -> p.CompletionResponse:
        per_prompt = body.num_candidates
        texts, lps, prompt_lps, finals = await _collect(stream, timers, body.max_tokens == 0)
        order: list[int] = list(range(len(timers)))
        if per_prompt > body.n:  # best_of: each prompt's n candidates of highest mean token logprob
            def mean_logprob(k: int) -> float:
                return sum(lp.logprob for lp in lps[k]) / max(1, len(lps[k]))

            order = [k for i in range(num_prompts)
                     for k in sorted(range(i * per_prompt, (i + 1) * per_prompt), key=mean_logprob,
                                     reverse=True)[:body.n]]
        choices = []
        for index, k in enumerate(order):
            choices.append(make_choice(k, "".join(texts[k]), finals[k].finish_reason, lps[k], prompt_lps[k]))
            choices[-1].index = index
        prompt_tokens = sum(finals[i * per_prompt].num_prompt_tokens for i in range(num_prompts))
        completion_tokens = sum(f.num_generated_tokens for f in finals)
        usage = p.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                            total_tokens=prompt_tokens + completion_tokens)
        return p.CompletionResponse(id=rid, model=model, choices=choices, usage=usage)

    async def _completion_events(stream: RequestStream, rid: str, model: str, num_prompts: int,
                                 body: p.CompletionRequest, timers: list[TokenTimer],
                                 make_choice: _CompletionChoices) -> AsyncIterator[str]:
        created = p.now()
        usage = body.include_usage
        exclude = None if usage else {"usage"}
        prompt_tokens, completion_tokens = [0] * num_prompts, 0
        try:
            async with stream:
                async for k, out in stream:
                    if body.max_tokens == 0:
                        out = _prompt_only(out)
                    timers[k].tokens(len(out.new_token_ids))
                    if out.finished:
                        timers[k].finish()
                        prompt_tokens[k // body.num_candidates] = out.num_prompt_tokens
                        completion_tokens += out.num_generated_tokens
                        if (err := _finish_error(out)) is not None:
                            yield _sse(json.dumps(error_body(err.status, err.message, code=err.code)))
                            continue
                    if not (out.new_text or out.finished or (make_choice.builders and out.new_logprobs)
                            or make_choice.needs_first_piece(k)):
                        continue
                    choice = make_choice(k, out.new_text, out.finish_reason, out.new_logprobs,
                                         out.prompt_logprobs)
                    chunk = p.CompletionResponse(id=rid, created=created, model=model, choices=[choice])
                    yield _sse(chunk.model_dump_json(exclude=exclude))
            if usage:
                total = sum(prompt_tokens)
                final = p.CompletionResponse(
                    id=rid, created=created, model=model, choices=[],
                    usage=p.UsageInfo(prompt_tokens=total, completion_tokens=completion_tokens,
                                      total_tokens=total + completion_tokens),
                )
                yield _sse(final.model_dump_json())
        except Exception as e:  # the status line is gone; report in the stream, as OpenAI does
            err = to_api_error(e)
            yield _sse(json.dumps(error_body(err.status, err.message, err.param, err.code)))
        yield _SSE_DONE

    # -- chat -------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", dependencies=[user])
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        body.check()
        adapter = adapter_of(body.model)
        tokenizer = engine.engine.tokenizer
        plan = tool_plan(body)
        ids = await off_loop(chat_ids, body, plan)
        max_model_len = engine.engine.max_model_len
        max_tokens = body.requested_max_tokens()
        if max_tokens is None:
            if len(ids) >= max_model_len:
                raise APIError(400, f"This model's maximum context length is {max_model_len} tokens; "
                               f"the messages take {len(ids)}.", "messages")
            max_tokens = max_model_len - len(ids)
        rid = body.response_id("chatcmpl")
        structured = await structured_outputs(*body.chat_constraint(plan))
        params = body.sampling_params(max_tokens, body.engine_logprobs, vocab_size(), structured)
        items = [GenerateItem(f"{rid}-{j}", ids, sp, adapter) for j, sp in enumerate(params)]
        check_length(len(ids), max_tokens)
        model = body.model or base_name()
        stream = await engine.submit(items)
        timers = [TokenTimer(metrics, t0) for _ in items]
        token_text = _TokenText(tokenizer) if body.logprobs else None
        if body.stream:
            return _SSEResponse(_chat_events(stream, rid, model, body, timers, token_text, plan), stream)
        return await _until_disconnect(request, _chat_response(stream, rid, model, timers, token_text, plan))

    async def _chat_response(stream: RequestStream, rid: str, model: str, timers: list[TokenTimer],
                             token_text: _TokenText | None, plan: ToolPlan) -> p.ChatCompletionResponse:
        texts, lps, prompt_lps, finals = await _collect(stream, timers)
        choices = []
        for k in range(len(timers)):
            content, calls = parse_output(plan, "".join(texts[k]))
            choices.append(p.ChatChoice(
                index=k, message=p.ChatResponseMessage(content=content, tool_calls=calls),
                finish_reason=finish_reason(finals[k].finish_reason, calls is not None),
                logprobs=_chat_logprobs(token_text, lps[k]) if token_text else None))
        prompt_tokens = finals[0].num_prompt_tokens
        completion_tokens = sum(f.num_generated_tokens for f in finals)
        usage = p.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                            total_tokens=prompt_tokens + completion_tokens)
        prompt_logprobs = _prompt_logprobs(token_text or _TokenText(engine.engine.tokenizer), prompt_lps[0])
        return p.ChatCompletionResponse(id=rid, model=model, choices=choices, usage=usage,
                                        prompt_logprobs=prompt_logprobs)

    async def _chat_events(stream: RequestStream, rid: str, model: str, body: p.ChatCompletionRequest,
                           timers: list[TokenTimer], token_text: _TokenText | None,
                           plan: ToolPlan) -> AsyncIterator[str]:
        created = p.now()
        usage = body.include_usage
        exclude = None if usage else {"usage"}

        def chunk(k: int, delta: p.DeltaMessage, finish: str | None = None,
                  logprobs: p.ChatLogprobs | None = None) -> str:
            c = p.ChatCompletionChunk(id=rid, created=created, model=model, choices=[
                p.ChatStreamChoice(index=k, delta=delta, logprobs=logprobs, finish_reason=finish)])
            return _sse(c.model_dump_json(exclude=exclude))

        prompt_tokens, completion_tokens = 0, 0
        parsers = [plan.parser() for _ in timers]  # text -> content and tool call deltas
        try:
            for k in range(len(timers)):
                yield chunk(k, p.DeltaMessage(role="assistant", content=""))
            async with stream:
                async for k, out in stream:
                    timers[k].tokens(len(out.new_token_ids))
                    content, calls = parsers[k].feed(out.new_text)
                    if out.finished and out.finish_reason in ("stop", "length"):
                        rest, more = parsers[k].finish()
                        content, calls = content + rest, calls + more
                    if content or calls or (token_text and out.new_logprobs):
                        lps = _chat_logprobs(token_text, out.new_logprobs) if token_text else None
                        delta = p.DeltaMessage(content=content if content or not calls else None,
                                               tool_calls=calls or None)
                        yield chunk(k, delta, logprobs=lps)
                    if out.finished:
                        timers[k].finish()
                        prompt_tokens = out.num_prompt_tokens
                        completion_tokens += out.num_generated_tokens
                        if (err := _finish_error(out)) is not None:
                            yield _sse(json.dumps(error_body(err.status, err.message, code=err.code)))
                            continue
                        finish = finish_reason(out.finish_reason, parsers[k].called)
                        yield chunk(k, p.DeltaMessage(), finish=finish)
            if usage:
                final = p.ChatCompletionChunk(
                    id=rid, created=created, model=model, choices=[],
                    usage=p.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                      total_tokens=prompt_tokens + completion_tokens),
                )
                yield _sse(final.model_dump_json())
        except Exception as e:
            err = to_api_error(e)
            yield _sse(json.dumps(error_body(err.status, err.message, err.param, err.code)))
        yield _SSE_DONE

    # -- vLLM's tokenizer routes -----------------------------------------------------------------
    @app.post("/tokenize", dependencies=[user])
    async def tokenize(body: p.TokenizeRequest) -> p.TokenizeResponse:
        check_model(body.model)
        if isinstance(body, p.TokenizeChatRequest):
            body.check_template_options()
            ids = await off_loop(chat_ids, body, tool_plan(body))
        else:
            ids = (await off_loop(tokenize_all, [body.prompt], body.add_special_tokens))[0]
        strs = None
        if body.return_token_strs:
            strs = engine.engine.tokenizer.convert_ids_to_tokens(ids)
        return p.TokenizeResponse(count=len(ids), max_model_len=engine.engine.max_model_len, tokens=ids,
                                  token_strs=strs)

    @app.post("/detokenize", dependencies=[user])
    async def detokenize(body: p.DetokenizeRequest) -> p.DetokenizeResponse:
        check_model(body.model)
        vocab = vocab_size()
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"tokens must be token ids in [0, {vocab})", "tokens")
        text = await off_loop(engine.engine.tokenizer.decode, body.tokens)
        return p.DetokenizeResponse(prompt=text)

    # -- adapters ---------------------------------------------------------------------------------
    async def adapter_cards(names: list[str] | None = None) -> list[p.AdapterCard]:
        base = base_name()
        return [
            p.AdapterCard(id=info.name, created=int(info.created), parent=base, size_bytes=info.size_bytes,
                          kind=info.kind, ranks=info.ranks, resident=tier,
                          virtual_tokens=info.num_virtual or None,
                          target_modules=list(info.target_modules) if info.target_modules else None)
            for info, tier in await engine.adapter_infos(names)
        ]

    @app.get("/v1/adapters", dependencies=[user])
    async def list_adapters() -> p.AdapterList:
        return p.AdapterList(data=await adapter_cards())

    @app.get("/v1/adapters/{name}", dependencies=[user])
    async def get_adapter(name: str) -> p.AdapterCard:
        return (await adapter_cards([name]))[0]

    def too_large() -> APIError:
        return APIError(413, f"the upload is larger than the server's limit of {cfg.max_upload_bytes} bytes")

    @app.post("/v1/adapters", status_code=201, dependencies=[admin], openapi_extra=_UPLOAD_SCHEMA)
    async def upload_adapter(request: Request, replace: bool = Query(False)) -> p.AdapterCard:
        limit = cfg.max_upload_bytes + _MULTIPART_SLACK
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise APIError(400, "invalid Content-Length header")
            if int(length) > limit:
                raise too_large()
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise APIError(422, "expected a multipart/form-data body with fields name, config and weights")
        body = _bounded(request.stream(), limit)
        parser = MultiPartParser(request.headers, body, max_files=2, max_fields=8)
        try:
            form = await parser.parse()
        except _UploadTooLarge:
            raise too_large() from None
        except MultiPartException as e:
            raise APIError(422, f"malformed multipart body: {e.message}") from None
        try:
            name, config, weights = form.get("name"), form.get("config"), form.get("weights")
            for field, value, kind in (("name", name, str), ("config", config, UploadFile),
                                       ("weights", weights, UploadFile)):
                if not isinstance(value, kind):
                    what = "a form field" if kind is str else "a file"
                    raise APIError(422, f"{field} is required as {what}", field)
            if isinstance(form.get("replace"), str):
                replace = replace or form["replace"].lower() in ("1", "true", "yes")
            config_bytes, weights_bytes = await config.read(), await weights.read()
        finally:
            await form.close()
        if len(config_bytes) + len(weights_bytes) > cfg.max_upload_bytes:
            raise too_large()
        await engine.add_adapter_bytes(name, config_bytes, weights_bytes, replace)
        return (await adapter_cards([name]))[0]

    @app.delete("/v1/adapters/{name}", dependencies=[admin])
    async def delete_adapter(name: str) -> dict:
        await engine.remove_adapter(name)
        return {"id": name, "object": "adapter", "deleted": True}

    @app.post("/v1/load_lora_adapter", dependencies=[admin])
    async def load_lora_adapter(body: p.LoadLoRAAdapterRequest) -> Response:
        await engine.add_adapter_path(body.lora_name, body.lora_path, body.load_inplace)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=[admin])
    async def unload_lora_adapter(body: p.UnloadLoRAAdapterRequest) -> Response:
        await engine.remove_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


class _GracefulServer(uvicorn.Server):
    """uvicorn, except that SIGTERM and SIGINT drain (`Drain.run`) before the usual shutdown, and
    the process then exits 0 instead of re-raising the signal. A second signal cuts the wait."""

    def __init__(self, config: uvicorn.Config, drain: Drain, drain_timeout: float) -> None:
        super().__init__(config)
        self._drain = drain
        self._drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task | None = None

    async def serve(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: it may interrupt the loop anywhere, so it only schedules.
        if self._loop is None or self._loop.is_closed():
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        if self._draining is not None:
            logger.warning("signal %d again: ending the requests in flight now", sig)
            self._drain.hurry()
            return
        logger.info("signal %d: draining for up to %g s", sig, self._drain_timeout)
        self._draining = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain.run(self._drain_timeout)
        finally:
            self.should_exit = True


def run_server(
    config: EngineConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    admin_key: str | None = None,
    log_level: str = "info",
) -> None:
    """Serve until SIGTERM or SIGINT, then drain for up to config.drain_timeout seconds and return.
    The port opens at once; /health is 503 until the model is loaded. Exits with status 1 if the
    engine cannot be built."""
    engine = AsyncEngine(config)
    server: uvicorn.Server | None = None

    def on_fatal(exc: BaseException | None = None) -> None:
        if server is not None:
            server.should_exit = True
        if exc is not None:
            exit_soon(FATAL_EXIT_GRACE_S)

    engine.on_fatal = on_fatal
    app = create_app(engine, api_key=api_key, admin_key=admin_key, on_fatal=on_fatal)
    # The drain already waited for the requests; uvicorn's own grace only covers a stuck client.
    server = _GracefulServer(uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(),
                                            timeout_graceful_shutdown=5),
                             app.state.drain, config.drain_timeout)
    server.run()
    if engine.error is not None or engine.fatal is not None:
        raise SystemExit(1)


# After the engine died: the grace lets uvicorn flush the error events already queued for open
# streams and close its sockets; a handler stuck on the dead engine thread must not keep the
# process (and its port) alive, so the timer ends it regardless.
FATAL_EXIT_GRACE_S = 2.0


def exit_soon(delay: float) -> None:
    def hard_exit() -> None:
        # Raw write and _exit: no lock (a logging handler's, an executor's join at exit) may stop it.
        os.write(2, b"slserve: the engine died; exiting with status 1\n")
        os._exit(1)

    timer = threading.Timer(delay, hard_exit)
    timer.daemon = True
    timer.start()
