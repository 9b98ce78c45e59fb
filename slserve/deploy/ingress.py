"""The ingress: the deployment's one HTTP entry, in front of the engine replicas.

It forwards every request unchanged to one replica, which answers with slserve's own app, and
chooses that replica through Ray Serve: a completion or chat request whose `model` is an adapter
carries the adapter's name as its multiplexed model id, so the router prefers a replica that holds
it (routing.py). It serves one route itself, /metrics (metrics.py), and names the replica that
answered in the `x-slserve-replica` response header.

Replica faults: a request that meets a dead replica before the replica took it goes to another
one; a request whose replica dies after taking it fails with a 503 (an SSE error event and
[DONE] once a stream has begun), as a request cut off by a restart would.

(No `from __future__ import annotations` here: Ray Serve's class-based FastAPI routes need the
annotations as objects to see that `request` is the Request.)
"""

import json
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from slserve.api.errors import APIError, error_response, install_error_handlers
from slserve.deploy.asgi import HTTPRequest, ResponseStart
from slserve.deploy.metrics import IngressMetrics

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-slserve-replica"
# Requests whose `model` names the adapter: they are routed by it.
_BY_MODEL = frozenset({"/v1/completions", "/v1/chat/completions"})
# A replica that died before taking the request: try this many replicas in all.
_ATTEMPTS = 3
_METRICS_TIMEOUT_S = 30.0
_REPLICA_GONE = (RayActorError, ReplicaUnavailableError)
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

# The replicas' app serves /docs and /openapi.json; the ingress adds no routes of its own there.
ingress_app = FastAPI(title="slserve ingress", docs_url=None, redoc_url=None, openapi_url=None)
install_error_handlers(ingress_app)  # the ingress's own failures are OpenAI errors too


@serve.ingress(ingress_app)
class Ingress:
    def __init__(self, engines: DeploymentHandle, max_body_bytes: int) -> None:
        self.engines = engines
        self.max_body_bytes = max_body_bytes
        self.metrics = IngressMetrics()
        self._base_names: frozenset[str] | None = None

    @ingress_app.get("/metrics")
    async def metrics_route(self) -> Response:
        answers = await self.engines.broadcast("request", HTTPRequest("GET", "/metrics")).results_async(
            timeout_s=_METRICS_TIMEOUT_S, return_exceptions=True)
        texts = {}
        for answer in answers:
            if isinstance(answer, BaseException):
                logger.warning("a replica's /metrics failed: %s", answer)
                continue
            replica, status, body = answer
            if status == 200:
                texts[replica] = body.decode()
        return Response(self.metrics.render(texts), media_type="text/plain; version=0.0.4; charset=utf-8")

    @ingress_app.api_route("/{path:path}", methods=_METHODS)
    async def forward_route(self, request: Request) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                return error_response(APIError(413, f"the request body is larger than the limit of "
                                                    f"{self.max_body_bytes} bytes"))
        scope = request.scope
        path, raw_path = scope["path"], scope.get("raw_path") or b""
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # deployed under a route prefix: the app's routes start at /
            path, raw_path = path[len(root):] or "/", b""
        forwarded = HTTPRequest(scope["method"], path, raw_path, scope["query_string"],
                                list(scope["headers"]), bytes(body))
        adapter = await self._adapter_of(forwarded)
        handle = self.engines.options(stream=True, multiplexed_model_id=adapter or "")
        for _ in range(_ATTEMPTS):
            stream: DeploymentResponseGenerator = handle.forward.remote(forwarded)
            try:
                replica = await stream.__anext__()
                break
            except _REPLICA_GONE as e:
                logger.warning("a replica died before taking a request; trying another: %s", e)
        else:
            return error_response(APIError(503, "no engine replica could take the request; retry later",
                                           code="no_replica", headers={"Retry-After": "1"}))
        self.metrics.requests.labels(replica).inc()
        try:
            start = await stream.__anext__()
        except _REPLICA_GONE:
            stream.cancel()
            return self._lost(replica)
        except BaseException:
            stream.cancel()
            raise
        assert isinstance(start, ResponseStart)
        headers = [*start.headers, (REPLICA_HEADER.encode(), replica.encode())]
        if not start.more:
            response = Response(start.body, start.status)
        else:
            response = StreamingResponse(self._rest(stream, replica, start), start.status)
        response.raw_headers = headers
        return response

    async def _rest(self, stream: DeploymentResponseGenerator, replica: str, start: ResponseStart
                    ) -> AsyncIterator[bytes]:
        done = False
        try:
            yield start.body
            async for chunk in stream:
                yield chunk
            done = True
        except _REPLICA_GONE:
            done = True
            lost = self._lost(replica)
            if _is_event_stream(start.headers):  # the status line is gone; say it in the stream
                yield b"data: " + lost.body + b"\n\ndata: [DONE]\n\n"
        finally:
            if not done:  # the client left: stop the replica's work
                stream.cancel()

    def _lost(self, replica: str) -> JSONResponse:
        self.metrics.lost.inc()
        logger.warning("replica %s died while serving a request", replica)
        message = f"the engine replica serving this request ({replica}) died; retry the request"
        return error_response(APIError(503, message, code="replica_died", headers={"Retry-After": "1"}))

    async def _adapter_of(self, request: HTTPRequest) -> str | None:
        """The adapter a completion or chat request names, or None for the base model (or a
        body the replica's app will refuse anyway)."""
        if request.method != "POST" or request.path not in _BY_MODEL:
            return None
        try:
            model = json.loads(request.body).get("model")
        except (ValueError, AttributeError):
            return None
        if not isinstance(model, str) or not model:
            return None
        if self._base_names is None:
            self._base_names = frozenset(await self.engines.base_models.remote())
        return None if model in self._base_names else model


def _is_event_stream(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)
