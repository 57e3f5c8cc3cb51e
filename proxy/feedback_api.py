"""``POST /v1/feedback``, ``GET /v1/domains`` and ``GET /v1/datasets/export``: the user's
feedback on answers, the knowledge domains their requests and memories touch, and the
distillation dataset built from both (`learner.datasets`).

Feedback names a response by its id: the ``x-request-id`` memlane returned with it (the
interaction's id in the teacher log), or the completion's own ``id`` where the log kept it.
Scoped like chat: a response of another user is as unknown as one that never existed (404).
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from learner import (
    MAX_CORRECTION_CHARS,
    RATINGS,
    UnknownResponse,
    build_dataset,
    domain_report,
    give_feedback,
)
from proxy.caller import caller, invalid_value
from proxy.errors import InvalidRequest, NotFound
from proxy.schema import read_json

__all__ = ["domains", "export_dataset", "feedback", "feedback_routes", "parse_feedback"]

_FIELDS = ("response_id", "rating", "correction")


def feedback_routes() -> list[Route]:
    return [
        Route("/v1/feedback", feedback, methods=["POST"]),
        Route("/v1/domains", domains, methods=["GET"]),
        Route("/v1/datasets/export", export_dataset, methods=["GET"]),
    ]


def parse_feedback(body: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """(response id, rating, correction) from a request body; InvalidRequest names the bad field.
    Shared with the CLI."""
    for name in body:
        if name not in _FIELDS:
            raise InvalidRequest(f"Unrecognized parameter: '{name}'. Allowed: {', '.join(_FIELDS)}.",
                                 param=name, code="unknown_parameter")
    response_id = body.get("response_id")
    if response_id is None:
        raise InvalidRequest("Missing required parameter: 'response_id'.", param="response_id",
                             code="missing_required_parameter")
    if not isinstance(response_id, str) or not 0 < len(response_id.strip()) <= 200:
        raise invalid_value("response_id", "a non-empty string of at most 200 characters")
    rating = body.get("rating")
    if rating is not None and rating not in RATINGS:
        raise invalid_value("rating", "good or bad")
    correction = body.get("correction")
    if correction is not None and (not isinstance(correction, str) or not correction.strip()
                                   or len(correction) > MAX_CORRECTION_CHARS):
        raise invalid_value("correction", f"a non-empty string of at most {MAX_CORRECTION_CHARS} characters")
    if rating is None and correction is None:
        raise InvalidRequest("Feedback needs a 'rating' (good or bad), a 'correction', or both.",
                             param="rating", code="missing_required_parameter")
    return response_id.strip(), rating, correction






async def feedback(request: Request) -> Response:
    user_id, store = caller(request)
    response_id, rating, correction = parse_feedback(await read_json(request))
    try:
        result = await asyncio.to_thread(give_feedback, store, user_id, response_id,
                                         rating=rating, correction=correction)
    except UnknownResponse as exc:
        raise NotFound(f"No response '{response_id}' for this user. Use the x-request-id memlane "
                       "returned with the answer.", param="response_id", code="response_not_found") from exc
    return JSONResponse({
        "object": "feedback", "response_id": response_id, "request_id": result.request_id,
        "rating": result.rating, "corrected": correction is not None, "weight": result.weight,
        "memories": {"involved": list(result.involved), "created": list(result.created),
                     "superseded": list(result.superseded)},
    })


async def domains(request: Request) -> Response:
    user_id, store = caller(request)
    shares = await asyncio.to_thread(domain_report, store, user_id)
    return JSONResponse({"object": "list", "user": user_id, "data": [s.as_dict() for s in shares]})


async def export_dataset(request: Request) -> Response:
    """The caller's dataset as JSONL; its version in ``x-memlane-dataset-version``."""
    user_id, store = caller(request)
    raw = request.query_params.get("seed", "0")
    if not raw.isdigit() or int(raw) > 2**31:
        raise invalid_value("seed", "an integer from 0 to 2147483648")
    dataset = await asyncio.to_thread(build_dataset, store, user_id, seed=int(raw))
    return Response(dataset.jsonl(), media_type="application/x-ndjson",
                    headers={"x-memlane-dataset-version": dataset.version,
                             "x-memlane-dataset-examples": str(len(dataset.examples))})
