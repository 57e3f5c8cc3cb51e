"""``memlane learner`` (run the learner; ``jobs``, ``dead-letters``, ``retry``) and ``memlane learn``.

``memlane learner`` runs the job loop in the foreground, in one of two ways:
- ``--url http://127.0.0.1:8080``: beside a server started with ``MEMLANE_LEARNER=external``. The
  server keeps the database file (DuckDB allows one writing process); this process leases jobs
  over HTTP, extracts (possibly calling the teacher model) and posts the facts back.
- no ``--url``: on the database file itself, when no server holds it (a backlog, a batch run).
The other commands open the file directly, or go through the server's API when it holds the file.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from typing import Annotated, Any

import httpx
import structlog
import typer
from rich.table import Table

from learner import ExtractionError, Extractor, JobRunner, find_consolidator, learn
from proxy.cli_memories import (
    ConfigOpt,
    DbOpt,
    UrlOpt,
    UserOpt,
    _Memories,
    console,
    fail,
    load_settings,
)
from proxy.learner_api import LEARNER_TOKEN_HEADER
from proxy.learner_setup import build_extractor, retry_policy, trigger_policy
from proxy.settings import Settings, SettingsError

__all__ = ["learn_command", "learner"]

log = structlog.get_logger("memlane.learner")
learner = typer.Typer(help="The background learner: run it, inspect its jobs and dead letters.")
ExtractorOpt = Annotated[str | None, typer.Option("--extractor", help="rules or llm (default: MEMLANE_LEARNER_EXTRACTOR).")]


@learner.callback(invoke_without_command=True)
def run(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option("--url", help="Lease jobs from this server (started with MEMLANE_LEARNER=external).")] = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
    extractor: ExtractorOpt = None,
    until_idle: Annotated[bool, typer.Option("--until-idle", help="Exit once no job is due.")] = False,
    batch: Annotated[int, typer.Option(help="Jobs per lease.", min=1, max=64)] = 8,
    poll: Annotated[float, typer.Option(help="Seconds between looks for due jobs when idle.")] = 1.0,
) -> None:
    """Run the learner: extract facts from logged interactions and store them as memories."""
    if ctx.invoked_subcommand is not None:
        return
    from proxy.logs import configure_logging

    settings = load_settings(config, database=db, learner_extractor=extractor)
    configure_logging(fmt=settings.log_format, level=settings.log_level)
    try:
        the_extractor = build_extractor(settings)
    except SettingsError as exc:
        raise fail(str(exc)) from exc
    stop = _stop_on_sigterm()
    if url:
        _run_remote(settings, url, the_extractor, until_idle=until_idle, batch=batch, poll=poll, stop=stop)
    else:
        _run_local(settings, the_extractor, until_idle=until_idle, batch=batch, poll=poll)


def _stop_on_sigterm() -> list[bool]:
    stop = [False]

    def handler(signum: int, frame: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, handler)
    return stop


def _run_local(settings: Settings, extractor: Extractor, *, until_idle: bool, batch: int, poll: float) -> None:
    import duckdb

    from proxy.app import build_embedder, open_store

    embedder = build_embedder(settings)
    try:
        store = open_store(settings, embedder)
    except duckdb.IOException as exc:
        raise fail(f"{settings.database} is held by another process (a server?): start the server with "
                   "MEMLANE_LEARNER=external and run `memlane learner --url http://HOST:PORT`") from exc
    runner = JobRunner(store, embedder, extractor, retry=retry_policy(settings), triggers=trigger_policy(settings),
                       consolidate=find_consolidator(), batch=batch, poll_s=poll)
    log.info("learner_started", mode="database", extractor=extractor.name)
    try:
        released = store.release_leases()
        if released:
            log.info("jobs_released", jobs=released)
        runner.run_forever(until_idle=until_idle)
    except KeyboardInterrupt:
        pass
    finally:
        store.close()
    log.info("learner_stopped")


def _run_remote(settings: Settings, url: str, extractor: Extractor, *, until_idle: bool, batch: int,
                poll: float, stop: list[bool]) -> None:
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    headers = _headers(settings)
    base = url.rstrip("/") + "/v1/learner/jobs"
    log.info("learner_started", mode="remote", extractor=extractor.name)
    with httpx.Client(timeout=120, trust_env=False, headers=headers) as client:
        while not stop[0]:
            try:
                jobs = _post(client, f"{base}/lease", {"owner": owner, "limit": batch,
                                                       "lease_s": settings.learner_lease_s})["data"]
            except httpx.TransportError as exc:  # the server is restarting: wait for it
                log.warning("learner_server_unreachable", error=type(exc).__name__)
                time.sleep(poll)
                continue
            if not jobs:
                if until_idle:
                    break
                time.sleep(poll)
                continue
            for job in jobs:
                _run_remote_job(client, base, owner, extractor, job)
    log.info("learner_stopped")


def _run_remote_job(client: httpx.Client, base: str, owner: str, extractor: Extractor, job: dict) -> None:
    started = time.perf_counter()
    try:
        facts = extractor.extract(job.get("input") or "")
    except Exception as exc:  # recorded on the job by the server: retried or dead-lettered
        error = f"{type(exc).__name__}: {exc}" if isinstance(exc, ExtractionError) else repr(exc)
        log.error("job_failed", job_id=job["id"], attempt=job["attempts"], error=error[:300])
        try:
            _post(client, f"{base}/{job['id']}/fail", {"owner": owner, "error": error[:2000]}, lost_ok=True)
        except (typer.Exit, httpx.TransportError) as post_exc:  # the lease runs out: retried anyway
            log.error("job_failed", job_id=job["id"], step="fail", error=repr(post_exc))
        return
    body = {"owner": owner, "extractor": extractor.name, "facts": [f.model_dump(mode="json") for f in facts]}
    try:
        done = _post(client, f"{base}/{job['id']}/complete", body, lost_ok=True)
    except (typer.Exit, httpx.TransportError) as exc:  # the lease runs out and the job is retried
        log.error("job_failed", job_id=job["id"], attempt=job["attempts"], step="complete", error=repr(exc))
        return
    if done is None:
        log.warning("job_lease_lost", job_id=job["id"])
        return
    log.info("job_done", job_id=job["id"], attempt=job["attempts"], facts=len(facts),
             extractor=extractor.name, ms=round((time.perf_counter() - started) * 1000, 1))


def _post(client: httpx.Client, url: str, body: dict, *, lost_ok: bool = False) -> Any:
    response = client.post(url, json=body)
    if lost_ok and response.status_code == 409:
        return None
    if response.status_code >= 400:
        raise fail(f"{url}: {response.status_code}: {_message(response)}")
    return response.json()


def _headers(settings: Settings) -> dict[str, str]:
    headers = {}
    if settings.learner_token is not None:
        headers[LEARNER_TOKEN_HEADER] = settings.learner_token.get_secret_value()
    key = os.environ.get("MEMLANE_API_KEY")
    if key:
        headers["authorization"] = f"Bearer {key}"
    return headers


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


# -- jobs and dead letters -------------------------------------------------------------


class _Jobs(_Memories):
    """Direct file access, or the server's learner API (with the learner token when set)."""

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        token = self.settings.learner_token
        if token is not None:
            kw["headers"] = {**kw.get("headers", {}), LEARNER_TOKEN_HEADER: token.get_secret_value()}
        return super().call(method, path, **kw)


def _show(jobs: list[dict]) -> None:
    table = Table("id", "user", "state", "attempts", "next attempt", "last error")
    for j in jobs:
        table.add_row(j["id"], j["user_id"], j["state"], str(j["attempts"]),
                      str(j["next_attempt_at"])[:19], (j.get("last_error") or "")[:80])
    console.print(table)


@learner.command("jobs")
def list_jobs(
    state: Annotated[str | None, typer.Option(help="pending, leased, done or dead.")] = None,
    limit: int = 100, db: DbOpt = None, config: ConfigOpt = None, url: UrlOpt = None,
) -> None:
    """List the learner's jobs, newest first."""
    with _Jobs(db, config, url, None) as m:
        if m.store is not None:
            rows = [j.to_dict() for j in m.store.jobs(state=state, limit=limit)]
        else:
            params: dict[str, Any] = {"limit": limit} | ({"state": state} if state else {})
            rows = m.call("GET", "/v1/learner/jobs", params=params).json()["data"]
        _show(rows)


@learner.command("dead-letters")
def dead_letters(limit: int = 100, db: DbOpt = None, config: ConfigOpt = None, url: UrlOpt = None) -> None:
    """Jobs that failed every attempt: their errors, and `memlane learner retry ID` to requeue."""
    list_jobs(state="dead", limit=limit, db=db, config=config, url=url)


@learner.command("retry")
def retry(job_id: str, db: DbOpt = None, config: ConfigOpt = None, url: UrlOpt = None) -> None:
    """Requeue a dead-lettered job to run now, with a fresh attempt count."""
    with _Jobs(db, config, url, None) as m:
        if m.store is not None:
            job = m.store.retry_job(job_id)
            if job is None:
                raise fail(f"no dead or waiting job {job_id}")
            row = job.to_dict()
        else:
            row = m.call("POST", f"/v1/learner/jobs/{job_id}/retry").json()
        console.print(f"requeued {row['id']} ({row['state']})")


def learn_command(
    user: UserOpt = None, db: DbOpt = None, config: ConfigOpt = None, url: UrlOpt = None,
) -> None:
    """Run a learning pass for a user now: promotion, consolidation, a training request."""
    with _Memories(db, config, url, user) as m:
        if m.store is not None:
            run_ = learn(m.store, m.user_id, "request", consolidate=find_consolidator()).to_dict()
        else:
            run_ = m.call("POST", "/v1/learn").json()
        request = run_["training_request"]
        promoted = sum((run_["promotion"].get("promoted") or {}).values())
        console.print(f"user {run_['user']}: promoted {promoted}, expired {run_['promotion'].get('expired', 0)}, "
                      f"consolidation {'done' if run_['consolidation'] is not None else 'not installed'}, "
                      f"training request {request['id']} ({request['state']}, {request['interactions']} interactions)")
