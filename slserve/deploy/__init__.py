"""slserve on Ray Serve: N engine replicas behind one OpenAI-compatible ingress, routed by adapter.

    from slserve.deploy import RayConfig, ray_app
    serve.run(ray_app(EngineConfig(...), RayConfig(replicas=4)), route_prefix="/")

`ray_app` and `run` need Ray (`pip install 'slserve[ray]'`); importing this package does not.
"""

from __future__ import annotations

from typing import Any

from slserve.deploy.config import RayConfig

__all__ = ["RayConfig", "ray_app", "run"]


def __getattr__(name: str) -> Any:
    if name in ("ray_app", "run"):
        from slserve.deploy import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
