"""The Engine on one dedicated thread, fed from asyncio.

    event loop (HTTP)                          engine thread
    generate() --- ("add", ...) ------------>  drain commands: add / abort / call(fn)
               <-- accepted | error ---------  (one call_soon_threadsafe per drain)
               <-- StepOutputs of one step --  engine.step()   (one call_soon_threadsafe per step)
    cancel ------- ("abort", ids) ---------->
    call(fn) ----- ("call", fn, Future) ---->  fn(engine) between two steps -> Future

The engine thread blocks on its command queue while there is no work and never waits for the
event loop: results go out through loop.call_soon_threadsafe, which only appends to a deque.
The engine itself is built on this thread too; until then `ready` is False.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from slserve.config import EngineConfig
from slserve.engine import Engine
from slserve.memory.adapter_store import AdapterInfo
from slserve.memory.host_malloc import release_free_memory
from slserve.outputs import StepOutput
from slserve.request import Request, Status
from slserve.sampling_params import SamplingParams
from slserve.scheduler.scheduler import AFFINITY_WINDOW

logger = logging.getLogger(__name__)

T = TypeVar("T")


class QueueFull(RuntimeError):
    """More requests wait for admission than config.max_queue allows (HTTP 429)."""


class EngineNotReady(RuntimeError):
    """The engine is still being built, or failed to build, or is shut down (HTTP 503)."""


@dataclass(frozen=True)
class GenerateItem:
    """One engine request: a prompt (text or token ids), its sampling settings and adapter."""

    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    adapter: str | None = None


class _Accepted:
    """Queue marker: every engine request of a stream was added."""


_ACCEPTED = _Accepted()
_STOP = ("stop",)


class AsyncEngine:
    def __init__(self, config: EngineConfig, engine_factory: Callable[[EngineConfig], Engine] = Engine):
        self.config = config
        self._factory = engine_factory
        self._engine: Engine | None = None
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="slserve-engine", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._done = threading.Event()  # built or failed
        self.error: BaseException | None = None
        self._stopped = False
        # Graceful stop (see `begin_drain`, `end_requests`): set on the loop thread only.
        self._draining = False
        self._refusing = False
        self.started_at: float | None = None
        # Requests not yet admitted by the scheduler: counted on the loop thread when submitted,
        # discounted on the engine thread when admitted, refused, aborted or failed.
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        # Engine-thread state.
        self._queues: dict[str, asyncio.Queue] = {}
        self._unadmitted: OrderedDict[str, Request] = OrderedDict()
        # Set once the running engine's state can no longer be trusted; then on_fatal (called on
        # the engine thread, after every open stream was failed) should end the process.
        self.fatal: BaseException | None = None
        self.on_fatal: Callable[[BaseException], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the engine thread; the engine is built there (see `ready`, `wait_ready`)."""
        self._loop = loop or asyncio.get_running_loop()
        self.started_at = time.time()
        self._thread.start()

    @property
    def started(self) -> bool:
        return self.started_at is not None

    @property
    def running(self) -> bool:
        """The engine is built and its thread serves: requests already received may still use it
        while the server drains."""
        return self._ready.is_set() and not self._stopped

    @property
    def ready(self) -> bool:
        """Ready for new requests (what /health reports): running and not draining."""
        return self.running and not self._draining

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def engine(self) -> Engine:
        """The engine, for its read-only attributes (tokenizer, model_name, max_model_len).
        Never call its methods from another thread: use `call`."""
        if not self.running:
            raise EngineNotReady(self.not_ready_reason())
        assert self._engine is not None
        return self._engine

    def not_ready_reason(self) -> str:
        if self.fatal is not None:
            return (f"the engine stopped after an unrecoverable error: "
                    f"{type(self.fatal).__name__}: {self.fatal}")
        if self.error is not None:
            return f"the engine failed to start: {type(self.error).__name__}: {self.error}"
        if self._stopped or self._refusing:
            return "the server is shutting down"
        if self._draining:
            return "the server is draining: it finishes the requests it has and accepts no new ones"
        return "the model is still loading"

    async def wait_ready(self) -> bool:
        """True once the engine is built, False if building it failed."""
        await asyncio.get_running_loop().run_in_executor(None, self._done.wait)
        return self._ready.is_set()

    def begin_drain(self) -> None:
        """Stop being ready (/health answers 503) while the requests already received go on."""
        self._draining = True

    async def end_requests(self, reason: str) -> int:
        """Refuse every later submit and end every unfinished request now: each open stream gets
        EngineNotReady(reason) (HTTP 503), and the engine aborts the requests, freeing their pages.
        Returns how many engine requests were ended."""
        self._draining = self._refusing = True
        if not self.running:
            return 0
        err = EngineNotReady(reason)

        def end_all(engine: Engine) -> int:  # on the engine thread, between two steps
            ended = self._fail_streams(err)
            for rid in ended:
                engine.abort(rid)
            self._discount(len(self._unadmitted))
            self._unadmitted.clear()
            return len(ended)

        return await self.call(end_all)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopped = True
        if self._thread.is_alive():
            self._commands.put(_STOP)
            self._thread.join(timeout)

    # -- requests --------------------------------------------------------------------------------
    async def submit(self, items: Sequence[GenerateItem]) -> RequestStream:
        """Add several requests together (n > 1, several prompts): all are added or none.

        Returns once the engine thread has accepted them (raising the engine's RequestError, or
        QueueFull, or EngineNotReady otherwise), before any token exists, so that an HTTP handler
        can still answer with an error status. Close the stream (or use `async with`) to abort
        what is unfinished.
        """
        # A draining server still adds the requests it received before the drain began (the HTTP
        # layer refuses new ones); once the rest are ended nothing more gets in.
        if not self.running or self._refusing:
            raise EngineNotReady(self.not_ready_reason())
        n = len(items)
        with self._waiting_lock:
            if self._waiting + n > self.config.max_queue:
                raise QueueFull(
                    f"the server's queue is full ({self.config.max_queue} requests waiting); retry later"
                )
            self._waiting += n
        stream = RequestStream(self, items)
        self._commands.put(("add", list(items), stream.queue))
        try:
            first = await stream.queue.get()
        except BaseException:
            stream.close()  # cancelled while waiting: abort whatever gets added
            raise
        if isinstance(first, BaseException):
            raise first
        return stream

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        adapter: str | None = None,
        request_id: str = "req",
    ) -> AsyncIterator[StepOutput]:
        """Stream one request's StepOutputs; aborts it if the consumer stops early."""
        async with await self.submit([GenerateItem(request_id, prompt, params, adapter)]) as stream:
            async for _, out in stream:
                yield out

    def _abort(self, request_ids: list[str]) -> None:
        self._commands.put(("abort", request_ids))

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run fn(engine) on the engine thread between two steps and return its result."""
        if not self.running:
            raise EngineNotReady(self.not_ready_reason())
        future: Future = Future()
        self._commands.put(("call", fn, future))
        return await asyncio.wrap_future(future)

    async def stats(self) -> dict[str, Any]:
        return await self.call(lambda e: e.stats())

    # -- adapters --------------------------------------------------------------------------------
    # Validating and writing an upload can take a while for a large adapter, so it runs on a worker
    # thread against the adapter store (thread-safe by design); only dropping the device copy of a
    # replaced or deleted adapter touches engine state, and that runs on the engine thread.

    async def add_adapter_bytes(self, name: str, config: bytes, weights: bytes, replace: bool = False
                                ) -> None:
        store = self.engine.store
        await asyncio.to_thread(store.add_from_bytes, name, config, weights, replace=replace)
        await self.call(lambda e: e.invalidate_adapter(name))

    async def add_adapter_path(self, name: str, path: str, replace: bool = False) -> None:
        store = self.engine.store
        await asyncio.to_thread(store.add_from_path, name, path, replace=replace)
        await self.call(lambda e: e.invalidate_adapter(name))

    async def remove_adapter(self, name: str) -> None:
        """Running requests keep their (pinned) device copy until they finish; new ones get 404."""
        await asyncio.to_thread(self.engine.store.remove, name)
        await self.call(lambda e: e.invalidate_adapter(name))

    async def adapter_infos(self, names: list[str] | None = None) -> list[tuple[AdapterInfo, str]]:
        """(AdapterInfo, tier) of the named adapters (default: all); tier is disk, host or device.
        An unknown name raises AdapterNotFoundError."""

        def infos(e: Engine) -> list[tuple[AdapterInfo, str]]:
            result = []
            for name in e.adapters() if names is None else names:
                result.append(e.adapter_info(name))
            return result

        return await self.call(infos)

    # -- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._engine = self._factory(self.config)
        except BaseException as e:  # reported through /health and the server's exit status
            logger.exception("building the engine failed")
            self.error = e
            self._done.set()
            return
        self._ready.set()
        self._done.set()
        engine = self._engine
        workers = getattr(engine, "workers", None)  # tensor-parallel workers (tp.py), if any
        if workers is not None:  # a worker lost while idle wakes the loop, which then dies
            workers.on_failure = lambda exc: self._commands.put(("fatal", exc))
        logger.info("engine ready: %s", engine.model_name)
        stepped = False  # since the engine was last idle
        try:
            while True:
                if stepped and not engine.has_unfinished():
                    stepped = False
                    release_free_memory()  # the steps' freed buffers, before sleeping (host_malloc.py)
                # Block only when there is nothing to step; then take whatever else is queued.
                commands = [] if engine.has_unfinished() else [self._commands.get()]
                with contextlib.suppress(queue.Empty):
                    while True:
                        commands.append(self._commands.get_nowait())
                fatal = next((c[1] for c in commands if c[0] == "fatal"), None)
                if fatal is not None:
                    raise fatal
                if _STOP in commands:
                    self._fail_all(EngineNotReady("the server is shutting down"))
                    break
                if commands:
                    self._post(self._handle(engine, commands))
                if engine.has_unfinished():
                    stepped = True
                    self._post(self._step(engine))
        except BaseException as e:
            self._die(e)
        finally:
            self._ready.clear()
            self._stopped = True
            with contextlib.suppress(Exception):
                engine.close()

    def _die(self, exc: BaseException) -> None:
        """The engine's state cannot be trusted (Engine.step raises only then): refuse everything,
        end every open stream with an error, and let the owner end the process."""
        logger.critical("the engine loop died; the process must be restarted", exc_info=exc)
        self.fatal = exc
        self._ready.clear()
        self._fail_all(exc)
        if self.on_fatal is not None:
            try:
                self.on_fatal(exc)
            except Exception:
                logger.exception("on_fatal failed")

    def _handle(self, engine: Engine, commands: list[tuple]) -> list[tuple[asyncio.Queue, Any]]:
        posts: list[tuple[asyncio.Queue, Any]] = []
        for cmd in commands:
            kind = cmd[0]
            if kind == "add":
                posts.append((cmd[2], self._add(engine, cmd[1], cmd[2])))
            elif kind == "abort":
                for rid in cmd[1]:
                    self._queues.pop(rid, None)
                    if self._unadmitted.pop(rid, None) is not None:
                        self._discount(1)
                    engine.abort(rid)
            elif kind == "call":
                _, fn, future = cmd
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(engine))
                    except BaseException as e:
                        future.set_exception(e)
        return posts

    def _add(self, engine: Engine, items: list[GenerateItem], out_queue: asyncio.Queue) -> Any:
        added: list[Request] = []
        try:
            for item in items:
                added.append(engine.add_request(item.prompt, item.params, item.adapter, item.request_id))
        except Exception as e:
            for req in added:
                engine.abort(req.request_id)
            self._discount(len(items))
            return e
        for req in added:
            self._queues[req.request_id] = out_queue
            self._unadmitted[req.request_id] = req
        return _ACCEPTED

    def _step(self, engine: Engine) -> list[tuple[asyncio.Queue, Any]]:
        outputs = engine.step()
        # Admission picks only among the first AFFINITY_WINDOW waiting requests (scheduler.py),
        # so past that many still waiting, none further down has left.
        left, still_waiting = [], 0
        for rid, req in self._unadmitted.items():
            if req.status is not Status.WAITING:
                left.append(rid)
            else:
                still_waiting += 1
                if still_waiting == AFFINITY_WINDOW:
                    break
        for rid in left:
            del self._unadmitted[rid]
        self._discount(len(left))
        posts = []
        for out in outputs:
            q = self._queues.pop(out.request_id, None) if out.finished else self._queues.get(out.request_id)
            if q is not None:
                posts.append((q, out))
        return posts

    def _discount(self, n: int) -> None:
        if n:
            with self._waiting_lock:
                self._waiting -= n

    def _post(self, posts: list[tuple[asyncio.Queue, Any]]) -> None:
        """Hand results to the event loop in one callback."""
        if posts and self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(_deliver, posts)

    def _fail_streams(self, err: EngineNotReady) -> list[str]:
        """Send `err` to every open stream (once per stream) and forget their requests; returns the
        ids of those requests."""
        ended = list(self._queues)
        self._post([(q, err) for q in {id(q): q for q in self._queues.values()}.values()])
        self._queues.clear()
        return ended

    def _fail_all(self, exc: BaseException) -> None:
        """Tell every open stream and every queued command that no result will come."""
        err = exc if isinstance(exc, EngineNotReady) else EngineNotReady(
            f"the engine stopped: {type(exc).__name__}: {exc}")
        self._fail_streams(err)
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "call":
                cmd[2].set_exception(err)
            elif cmd[0] == "add":
                self._post([(cmd[2], err)])


class RequestStream:
    """(index into the submitted items, StepOutput) as the engine produces them, until every
    request finished. close() aborts the unfinished ones (their pages are freed)."""

    def __init__(self, owner: AsyncEngine, items: Sequence[GenerateItem]) -> None:
        self._owner = owner
        self._index = {item.request_id: i for i, item in enumerate(items)}
        self._unfinished = set(self._index)
        self.queue: asyncio.Queue = asyncio.Queue()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> tuple[int, StepOutput]:
        if not self._unfinished:
            raise StopAsyncIteration
        out = await self.queue.get()
        if isinstance(out, BaseException):
            self._unfinished.clear()
            raise out
        if out.finished:
            self._unfinished.discard(out.request_id)
        return self._index[out.request_id], out

    def close(self) -> None:
        if self._unfinished:
            self._owner._abort(sorted(self._unfinished))
            self._unfinished.clear()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _deliver(posts: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in posts:
        q.put_nowait(item)
