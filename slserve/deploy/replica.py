"""One engine replica: slserve's own FastAPI app around one engine, run by Ray Serve.

The ingress forwards every HTTP request here unchanged (`forward`), so routes, auth, errors,
streaming and metrics are those of `slserve serve`. Before the app sees a request, the replica
brings its adapters up to date with the shared adapter directory (`CatalogEngine.sync`), and a
request for an adapter passes Ray Serve's multiplexing hook, which tells the router that this
replica holds that adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse
from ray import serve
from starlette.types import ASGIApp, Receive, Scope, Send

from slserve.adapters.peft_format import AdapterError, read_adapter_dir
from slserve.api.errors import error_body
from slserve.api.server import FATAL_EXIT_GRACE_S, create_app, exit_soon
from slserve.async_engine import AsyncEngine
from slserve.config import EngineConfig
from slserve.deploy.asgi import HTTPRequest, ResponseStart, call_asgi
from slserve.deploy.catalog import Catalog
from slserve.deploy.config import RayConfig
from slserve.memory.adapter_store import AdapterNotFoundError

logger = logging.getLogger(__name__)

# Served from the replica's own state; they must answer even when the shared directory does not.
_NO_SYNC = ("/health", "/metrics")


class CatalogEngine(AsyncEngine):
    """An AsyncEngine whose adapters mirror the shared adapter directory: an upload, replace or
    delete changes both, and `sync` copies in what other replicas changed."""

    def __init__(self, config: EngineConfig, catalog: Catalog) -> None:
        super().__init__(config)
        self.catalog = catalog
        self._versions: dict[str, str] = {}  # adapter -> catalog version held locally
        self._synced: int | None = None  # catalog generation of the last sync
        self._sync_lock = asyncio.Lock()

    async def sync(self) -> None:
        """Copy in every adapter whose version changed since the last sync, drop deleted ones."""
        if self.catalog.generation() == self._synced:
            return
        async with self._sync_lock:
            generation = self.catalog.generation()
            if generation == self._synced:
                return
            entries = await asyncio.to_thread(self.catalog.entries)
            for name in set(self._versions) - set(entries):
                with contextlib.suppress(AdapterNotFoundError):
                    await AsyncEngine.remove_adapter(self, name)
                del self._versions[name]
            for name, version in entries.items():
                if self._versions.get(name) == version:
                    continue
                try:
                    await AsyncEngine.add_adapter_path(self, name, str(self.catalog.path(name, version)),
                                                       replace=True)
                except AdapterError as e:
                    # A broken hand-copied adapter, or a version replaced while this copied it
                    # (then the generation moved on and the next sync takes the new one).
                    logger.warning("adapter %r (%s) not taken from the shared directory: %s",
                                   name, version, e)
                self._versions[name] = version
            self._synced = generation

    async def add_adapter_bytes(self, name: str, config: bytes, weights: bytes, replace: bool = False
                                ) -> None:
        # The local store validates it (400, 409) before anything reaches the shared directory.
        await super().add_adapter_bytes(name, config, weights, replace)
        try:
            version = await asyncio.to_thread(self.catalog.publish, name, config, weights, replace)
        except BaseException:
            # Another replica took the name meanwhile (409), or the directory failed: the local
            # copy must not outlive the failure; the next sync restores what the directory holds.
            with contextlib.suppress(AdapterNotFoundError):
                await AsyncEngine.remove_adapter(self, name)
            self._versions.pop(name, None)
            self._synced = None
            raise
        self._versions[name] = version

    async def add_adapter_path(self, name: str, path: str, replace: bool = False) -> None:
        config, weights = await asyncio.to_thread(read_adapter_dir, path, name)
        await self.add_adapter_bytes(name, config, weights, replace)

    async def remove_adapter(self, name: str) -> None:
        await super().remove_adapter(name)
        self._versions.pop(name, None)
        with contextlib.suppress(AdapterNotFoundError):
            await asyncio.to_thread(self.catalog.remove, name)


class _SyncFirst:
    """ASGI middleware: sync the adapters before a request reaches the app."""

    def __init__(self, app: ASGIApp, engine: CatalogEngine) -> None:
        self.app = app
        self.engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in _NO_SYNC and self.engine.running:
            try:
                await self.engine.sync()
            except OSError as e:
                logger.exception("reading the shared adapter directory failed")
                body = error_body(503, f"the shared adapter directory could not be read: {e}")
                await JSONResponse(body, 503)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class EngineReplica:
    """The Ray Serve deployment class of one engine replica (see ray_app)."""

    async def __init__(self, config: EngineConfig, ray_config: RayConfig) -> None:
        self.replica = serve.get_replica_context().replica_id.unique_id
        # The engine's store owns a private directory; the shared one is the catalog.
        root = Path(ray_config.local_adapter_root or tempfile.gettempdir()) / "slserve-replicas"
        root.mkdir(parents=True, exist_ok=True)
        self._local = Path(tempfile.mkdtemp(prefix=f"{self.replica}-", dir=root))
        self.base_names = [config.model] if config.model else []
        local_config = replace(config, adapter_dir=str(self._local))
        self.engine = CatalogEngine(local_config, Catalog(config.adapter_path))
        # As under `slserve serve`: a dead engine ends the process (after the open streams got
        # their errors), and Ray Serve starts a new replica.
        self.engine.on_fatal = lambda _: exit_soon(FATAL_EXIT_GRACE_S)
        app = create_app(self.engine, api_key=ray_config.api_key, admin_key=ray_config.admin_key)
        self._lifespan = app.router.lifespan_context(app)
        await self._lifespan.__aenter__()
        if not await self.engine.wait_ready():
            raise RuntimeError(self.engine.not_ready_reason())
        self.base_names.append(self.engine.engine.model_name)
        await self.engine.sync()
        self.app = _SyncFirst(app, self.engine)

        async def hold(adapter: str) -> str:
            # Nothing to load: the engine pages adapters in itself. Holding the name is what tells
            # the router to send this adapter's requests here.
            return adapter

        self._hold = serve.multiplexed(max_num_models_per_replica=ray_config.adapters_per_replica)(hold)
        logger.info("replica %s ready on pid %d", self.replica, os.getpid())

    async def forward(self, request: HTTPRequest) -> AsyncIterator[str | ResponseStart | bytes]:
        """This replica's id first (the request reached a live replica), then the response."""
        yield self.replica
        adapter = serve.get_multiplexed_model_id()
        if adapter and self.engine.running:
            await self.engine.sync()
            if adapter in self.engine.engine.store:  # an unknown name gets the app's 404, not a hold
                await self._hold(adapter)
        async for item in call_asgi(self.app, request):
            yield item

    async def request(self, request: HTTPRequest) -> tuple[str, int, bytes]:
        """(replica, status, body): the whole response at once, for broadcasts."""
        status, parts = 500, []
        async for item in call_asgi(self.app, request):
            if isinstance(item, ResponseStart):
                status = item.status
                item = item.body
            parts.append(item)
        return self.replica, status, b"".join(parts)

    def base_models(self) -> list[str]:
        """The `model` values that mean the base model (not an adapter)."""
        return self.base_names

    def info(self) -> dict[str, Any]:
        return {"replica": self.replica, "pid": os.getpid()}

    def check_health(self) -> None:
        if not self.engine.running:
            raise RuntimeError(self.engine.not_ready_reason())

    async def __del__(self) -> None:
        # Ray Serve calls this on a graceful stop, also after a failed __init__.
        if getattr(self, "_lifespan", None) is not None:
            await self._lifespan.__aexit__(None, None, None)
        if getattr(self, "_local", None) is not None:
            shutil.rmtree(self._local, ignore_errors=True)
