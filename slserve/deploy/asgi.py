"""One HTTP request, shipped as plain data, run through an ASGI app in this process.

A replica serves slserve's FastAPI app this way: the ingress sends an `HTTPRequest` through Ray
and streams back what `call_asgi` yields, a `ResponseStart` (status, headers and the first body
chunk together, so a JSON answer travels whole) and then the rest of the body. Closing the
generator early (the client went away, the ingress cancelled) tells the app `http.disconnect`,
which aborts its engine requests as it does under uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HTTPRequest:
    method: str
    path: str  # decoded, as ASGI's scope["path"]
    raw_path: bytes = b""
    query: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


@dataclass(frozen=True)
class ResponseStart:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes  # the first body chunk
    more: bool  # whether more body follows


async def call_asgi(app: ASGIApp, request: HTTPRequest) -> AsyncIterator[ResponseStart | bytes]:
    """The app's response to `request`: one ResponseStart, then body chunks."""
    messages: asyncio.Queue[Message | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        messages.put_nowait(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": request.method, "scheme": "http", "path": request.path,
        "raw_path": request.raw_path or request.path.encode(), "query_string": request.query,
        "root_path": "", "headers": list(request.headers), "client": None, "server": None, "state": {},
    }
    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    task.add_done_callback(_log_failure)
    start: Message | None = None
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                start = message
                continue
            if message["type"] != "http.response.body":
                continue
            chunk, more = message.get("body", b""), message.get("more_body", False)
            if start is not None:
                yield ResponseStart(start["status"], list(start.get("headers", [])), chunk, more)
                start = None
            elif chunk:
                yield chunk
            if not more:
                return
        raise RuntimeError("the app ended without a complete response")
    finally:
        # Whether the response ended or the reader left: the app sees the disconnect and finishes
        # on its own (an unfinished stream aborts its engine requests).
        disconnected.set()


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("the app failed on a forwarded request", exc_info=task.exception())
