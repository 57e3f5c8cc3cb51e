"""Small endpoints: models list, liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import asyncio

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.local import LocalUpstream
from proxy.state import AppState


async def list_models(request: Request) -> Response:
    state: AppState = request.app.state.memlane
    state.keyring.authenticate(request.headers)
    seen: dict[str, str] = {}
    for route in state.settings.routes:
        upstream = state.upstreams.get(route.provider)
        names = list(route.models)
        if isinstance(upstream, LocalUpstream):
            names += upstream.served_models(route)
        for name in names:
            seen.setdefault(name, route.provider)
    data = [{"id": name, "object": "model", "created": 0, "owned_by": owner} for name, owner in seen.items()]
    return JSONResponse({"object": "list", "data": data})


async def healthz(request: Request) -> Response:
    """Liveness: the process answers. Touches nothing else."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Readiness: the store answers and the local model is loaded or loadable."""
    state: AppState = request.app.state.memlane
    checks: dict[str, str] = {}
    ready = True
    if state.settings.memory:
        if state.store is None:
            checks["store"], ready = "unavailable", False
        else:
            try:
                await asyncio.wait_for(asyncio.to_thread(state.store.ping), 2.0)
                checks["store"] = "ok"
            except Exception as exc:
                checks["store"], ready = f"error: {type(exc).__name__}", False
                state.store.recover_soon(exc)
        loaded = getattr(state.embedder, "loaded", True)
        checks["embedder"] = "loaded" if loaded else "loading"
        ready = ready and loaded
    if "local" in state.upstreams and state.local_model is not None:
        if state.local_model.loaded:
            checks["local_model"] = "loaded"
        else:
            ok, how = state.local_model.loadable()
            checks["local_model"] = f"loadable ({how})" if ok else f"unavailable: {how}"
            ready = ready and ok
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    state: AppState = request.app.state.memlane
    if state.store is not None:
        try:  # read off the loop, briefly: a broken or busy store leaves the gauges as they were
            usage = await asyncio.wait_for(asyncio.to_thread(state.store.memory_usage), timeout=1.0)
        except Exception:
            usage = {}
        for tag, size in usage.items():
            state.metrics.store_memory.labels(tag=tag).set(size)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
