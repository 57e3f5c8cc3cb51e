"""``GET /v1/adapters``: the caller's personal adapter versions, newest first.

Read from the adapter registry under ``plm_dir`` (``adapters/plm/registry.py``): metadata only,
never weights, so no key is needed and nothing is decrypted. Scoped like ``/v1/memories``: the
key picks the user, and no parameter names another user. A deployment that never trained an
adapter answers an empty list.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.caller import caller_user
from proxy.state import AppState


async def list_adapters(request: Request) -> Response:
    user_id = caller_user(request)
    data = await asyncio.to_thread(adapter_versions, request.app.state.memlane, user_id)
    return JSONResponse({"object": "list", "data": data})


def adapter_versions(state: AppState, user_id: str) -> list[dict[str, Any]]:
    root = state.settings.plm_dir
    if not (root / "users").is_dir():
        return []
    from adapters.plm import AdapterRegistry

    registry = AdapterRegistry(root)
    live = registry.live(user_id)
    return [_summary(v, live is not None and v.version == live.version)
            for v in sorted(registry.versions(user_id), key=lambda v: -v.version)]


def _summary(version: Any, live: bool) -> dict[str, Any]:
    report = version.report or {}
    return {
        "object": "adapter",
        "version": version.version,
        "created_at": version.created_at,
        "status": version.status,
        "live": live,
        "stale": version.stale,
        "base": version.base,
        "parent": version.parent,
        "memories": len(version.memory_ids),
        "fact_recall": report.get("fact_recall"),
        "ppl_drift": report.get("ppl_drift"),
        "reasons": "; ".join(version.reasons) or None,
        "bytes": version.bytes,
    }
