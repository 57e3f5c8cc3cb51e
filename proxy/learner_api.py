"""``/v1/learn`` and ``/v1/learner/jobs``: the learner's queue over HTTP.

- ``POST /v1/learn``: a learning run for the caller's user now (promotion, consolidation,
  a training request for the personal model).
- ``GET /v1/learner/jobs?state=dead``, ``GET .../{id}``, ``POST .../{id}/retry``: the jobs and
  their dead letters. In open mode, and with the learner token, every user's; with a user key,
  that user's own only.
- ``POST /v1/learner/jobs/lease``, ``.../{id}/complete``, ``.../{id}/fail``: how an external
  ``memlane learner`` works beside the server. The server keeps the database (DuckDB allows one
  writing process): the learner leases jobs with the user's text, extracts, and posts the facts
  back; the server validates them against the same schema and applies them with the job's done
  mark in one transaction. These need ``X-Memlane-Learner-Token`` when ``MEMLANE_LEARNER_TOKEN``
  is set, and are refused when user keys are configured without one.
"""

from __future__ import annotations

import asyncio
import hmac
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from learner import ExtractedFact, LeaseLost, apply_facts, find_consolidator, learn
from memory import JOB_STATES, Job, MemoryStore
from proxy.auth import USER_HEADER, resolve_user
from proxy.errors import (
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ProxyError,
    ServiceUnavailable,
)
from proxy.learner_setup import retry_policy
from proxy.schema import read_json
from proxy.state import AppState

__all__ = ["LEARNER_TOKEN_HEADER", "learner_routes"]

LEARNER_TOKEN_HEADER = "x-memlane-learner-token"
MAX_LEASE = 64


class _Lease(BaseModel):
    model_config = ConfigDict(extra="forbid")
    owner: str = Field(min_length=1, max_length=200)
    limit: int = Field(default=8, ge=1, le=MAX_LEASE)
    lease_s: float = Field(default=120.0, gt=0, le=3600)


class _Complete(BaseModel):
    model_config = ConfigDict(extra="forbid")
    owner: str = Field(min_length=1, max_length=200)
    extractor: str = Field(min_length=1, max_length=200)
    facts: list[ExtractedFact] = Field(max_length=20)


class _Fail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    owner: str = Field(min_length=1, max_length=200)
    error: str = Field(min_length=1, max_length=2000)


def learner_routes() -> list[Route]:
    return [
        Route("/v1/learn", learn_now, methods=["POST"]),
        Route("/v1/learner/jobs", list_jobs, methods=["GET"]),
        Route("/v1/learner/jobs/lease", lease, methods=["POST"]),
        Route("/v1/learner/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/v1/learner/jobs/{job_id}/retry", retry, methods=["POST"]),
        Route("/v1/learner/jobs/{job_id}/complete", complete, methods=["POST"]),
        Route("/v1/learner/jobs/{job_id}/fail", fail, methods=["POST"]),
    ]


# -- who may see what ------------------------------------------------------------------


def _state(request: Request) -> tuple[AppState, MemoryStore]:
    state: AppState = request.app.state.memlane
    if state.store is None:
        raise ServiceUnavailable("The memory store is unavailable.", code="memory_unavailable")
    return state, state.store


def _has_learner_token(request: Request, state: AppState) -> bool:
    token = state.settings.learner_token
    presented = request.headers.get(LEARNER_TOKEN_HEADER)
    return token is not None and presented is not None and hmac.compare_digest(
        presented.encode(), token.get_secret_value().encode())


def _worker(request: Request) -> tuple[AppState, MemoryStore]:
    """An external learner: the learner token, or open mode when no token is configured."""
    state, store = _state(request)
    if _has_learner_token(request, state):
        return state, store
    if state.settings.learner_token is not None or not state.settings.open_mode:
        raise PermissionDenied(f"Leasing learner jobs needs the learner token in {LEARNER_TOKEN_HEADER} "
                               "(MEMLANE_LEARNER_TOKEN on the server).", code="learner_token_required")
    return state, store


def _scope(request: Request) -> tuple[AppState, MemoryStore, str | None]:
    """(state, store, the one user whose jobs the caller sees, or None for everyone's)."""
    state, store = _state(request)
    if _has_learner_token(request, state):
        return state, store, None
    principal = state.keyring.authenticate(request.headers)
    if state.settings.open_mode and USER_HEADER not in request.headers:
        return state, store, None
    return state, store, resolve_user(principal, body_user=None, header_user=request.headers.get(USER_HEADER))


def _job_or_404(store: MemoryStore, job_id: str, user_id: str | None) -> Job:
    job = store.get_job(job_id)
    if job is None or (user_id is not None and job.user_id != user_id):
        raise NotFound(f"No learner job '{job_id}'.", code="job_not_found")
    return job


async def _body(request: Request, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate(await read_json(request))
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequest(f"Invalid value for '{param}': {first['msg']}.", param=param,
                             code="invalid_value") from exc


# -- handlers --------------------------------------------------------------------------


async def learn_now(request: Request) -> Response:
    """A learning run for the caller's user, now."""
    state: AppState = request.app.state.memlane
    principal = state.keyring.authenticate(request.headers)
    user_id = resolve_user(principal, body_user=request.query_params.get("user"),
                           header_user=request.headers.get(USER_HEADER))
    _, store = _state(request)
    learner = getattr(state.learner, "runner", None)
    run = await asyncio.to_thread(learn, store, user_id, "request", consolidate=find_consolidator(),
                                  preload=getattr(learner, "preload", None))
    return JSONResponse(run.to_dict())


async def list_jobs(request: Request) -> Response:
    _, store, user_id = _scope(request)
    job_state = request.query_params.get("state")
    if job_state is not None and job_state not in JOB_STATES:
        raise InvalidRequest(f"Invalid value for 'state': expected one of {', '.join(JOB_STATES)}.",
                             param="state", code="invalid_value")
    try:
        limit = int(request.query_params.get("limit", "100"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 1000:
        raise InvalidRequest("Invalid value for 'limit': expected an integer from 1 to 1000.",
                             param="limit", code="invalid_value")
    jobs = await asyncio.to_thread(store.jobs, state=job_state, user_id=user_id, limit=limit)
    counts = await asyncio.to_thread(store.job_counts) if user_id is None else None
    body: dict[str, Any] = {"object": "list", "data": [j.to_dict() for j in jobs]}
    if counts is not None:
        body["counts"] = counts
    return JSONResponse(body)


async def get_job(request: Request) -> Response:
    _, store, user_id = _scope(request)
    job = await asyncio.to_thread(_job_or_404, store, request.path_params["job_id"], user_id)
    return JSONResponse(job.to_dict())


async def retry(request: Request) -> Response:
    """Requeue a dead-lettered job to run now."""
    state, store, user_id = _scope(request)
    job_id = request.path_params["job_id"]
    job = await asyncio.to_thread(_job_or_404, store, job_id, user_id)
    retried = await asyncio.to_thread(store.retry_job, job.id)
    if retried is None:
        raise ProxyError(f"Learner job '{job_id}' is {job.state}; only dead or waiting jobs are retried.",
                         status=409, param="job_id", code="job_not_retryable")
    _wake(state)
    return JSONResponse(retried.to_dict())


async def lease(request: Request) -> Response:
    _, store = _worker(request)
    body: _Lease = await _body(request, _Lease)
    jobs = await asyncio.to_thread(store.lease_jobs, body.owner, limit=body.limit,
                                   lease_for=timedelta(seconds=body.lease_s))
    return JSONResponse({"object": "list", "data": [j.to_dict(with_input=True) for j in jobs]})


async def complete(request: Request) -> Response:
    state, store = _worker(request)
    body: _Complete = await _body(request, _Complete)
    job = await asyncio.to_thread(_job_or_404, store, request.path_params["job_id"], None)
    try:
        await asyncio.to_thread(apply_facts, store, state.embedder, job, body.owner, body.facts, body.extractor)
    except LeaseLost as exc:
        state.metrics.learner_jobs.labels(outcome="lost").inc()
        raise _lease_lost(job.id) from exc
    state.metrics.learner_jobs.labels(outcome="done").inc()
    _wake(state, triggers=True)
    return JSONResponse(store.get_job(job.id).to_dict())  # type: ignore[union-attr]


async def fail(request: Request) -> Response:
    state, store = _worker(request)
    body: _Fail = await _body(request, _Fail)
    job = await asyncio.to_thread(_job_or_404, store, request.path_params["job_id"], None)
    new_state = await asyncio.to_thread(store.fail_job, job.id, body.owner, body.error, retry_policy(state.settings))
    if new_state is None:
        state.metrics.learner_jobs.labels(outcome="lost").inc()
        raise _lease_lost(job.id)
    state.metrics.learner_jobs.labels(outcome=new_state).inc()
    return JSONResponse(store.get_job(job.id).to_dict())  # type: ignore[union-attr]


def _lease_lost(job_id: str) -> ProxyError:
    return ProxyError(f"Learner job '{job_id}' is not leased to this owner (its lease ran out).",
                      status=409, code="lease_lost")


def _wake(state: AppState, *, triggers: bool = False) -> None:
    runner = getattr(state.learner, "runner", None)
    if runner is None:
        return
    if triggers:
        runner.poke_triggers()
    runner.wake()
