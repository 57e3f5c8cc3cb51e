"""The app factory. Resources open in the lifespan and reach handlers through app state.

Anything passed in (store, embedder, local model, HTTP client, upstreams) is used as given and
left open for the caller; anything built here is closed here. Shutdown drains the learner's
queue before the store closes, so every interaction accepted before SIGTERM is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from adapters import LocalModel
from learner import LearnerWorker, extract_facts, find_consolidator
from learner.dream import PreloadCache, Preloader
from learner.journal import InteractionJournal
from memory import (
    BatchingEmbedder,
    Embedder,
    HashEmbedder,
    MemoryStore,
    MiniLMEmbedder,
    TierPolicy,
)
from proxy import routes
from proxy.adapters_api import list_adapters
from proxy.auth import KeyCheckMiddleware, KeyRing
from proxy.chat import chat_completions
from proxy.egress import AdapterTraining, EgressPolicy
from proxy.errors import NotFound, ProxyError, anthropic_error_response, error_response
from proxy.feedback_api import feedback_routes
from proxy.interactions_api import list_interactions
from proxy.learner_api import learner_routes
from proxy.learner_setup import build_extractor, retry_policy, trigger_policy
from proxy.local import LocalUpstream, PersonalUpstream
from proxy.memories_api import (
    export_memories,
    import_memories,
    memories_collection,
    memory_item,
    wipe_memories,
)
from proxy.messages import count_tokens, messages
from proxy.metrics import Metrics
from proxy.middleware import RequestContextMiddleware
from proxy.openapi import openapi
from proxy.passthrough import completions, embeddings
from proxy.ratelimit import Limit, RateLimiter
from proxy.recall import Recaller
from proxy.settings import Settings
from proxy.shutdown import Draining
from proxy.state import AppState, DroppingSink
from proxy.translate import LiteLLMUpstream
from proxy.transport import ShardedTransport
from proxy.ui import ui_routes
from proxy.upstream import ChatUpstream, OpenAIUpstream

log = structlog.get_logger("memlane.app")


def create_app(
    settings: Settings,
    *,
    store: MemoryStore | None = None,
    embedder: Embedder | None = None,
    local_model: LocalModel | None = None,
    http_client: httpx.AsyncClient | None = None,
    upstreams: dict[str, ChatUpstream] | None = None,
    personal_model: Any = None,
    draining: Draining | None = None,
) -> Starlette:
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            client = http_client or await stack.enter_async_context(_http_client(settings))
            emb = embedder or build_embedder(settings)
            the_store = store or _open_store(settings, emb)
            model = local_model or _local_model(settings)
            if store is None and the_store is not None:
                stack.callback(the_store.close)
            if local_model is None:
                stack.callback(model.close)  # ends a running generation instead of waiting it out
            # One preload cache per process: the learner fills it, the request path reads it.
            preloaded = PreloadCache() if the_store is not None and settings.memory_preload != "off" else None
            learner = _start_learner(settings, the_store, emb, metrics, stack, nml_feed=_nml_feed(model),
                                     local_model=model, journal=store is None, preloaded=preloaded)
            if the_store is not None and _nml_feed(model) is not None:
                the_store.wipe_hooks.append(lambda user_id: model.store and model.store.forget(user_id))
            background = _warm_up(settings, emb, model, the_store)
            personal = _personal_model(settings, the_store, personal_model, stack)
            plm_updates = _start_plm_updates(settings, the_store, personal, metrics, stack)
            app.state.memlane = AppState(
                settings=settings,
                keyring=KeyRing(settings.keys, limiter=RateLimiter(
                    Limit.of(settings.rate_limit_rpm, settings.rate_limit_burst))),
                metrics=metrics,
                upstreams=_with_personal(upstreams or _upstreams(settings, client, model), personal),
                recaller=Recaller(
                    the_store, BatchingEmbedder(emb) if the_store is not None else None, metrics,
                    enabled=settings.memory, top_k=settings.memory_top_k,
                    min_score=settings.memory_min_score, token_cap=settings.memory_token_cap,
                    budget_s=settings.memory_budget_ms / 1000, plm=_plm_context(settings, personal or model),
                    egress=EgressPolicy.parse(settings.egress_policy), trained_on=_adapter_memories(personal),
                    preloaded=preloaded, preload=settings.memory_preload,
                ),
                learner=learner,
                store=the_store,
                embedder=emb,
                local_model=model,
                http_client=client,
                background=background,
                draining=draining or Draining(settings.shutdown_grace_s),
            )
            if plm_updates is not None:  # a stop signal stops a running update at once
                app.state.memlane.draining.on_begin(plm_updates.cancel)
            log.info("memlane_started", memory=settings.memory, open_mode=settings.open_mode,
                     routes=[f"{r.match}->{r.provider}" for r in settings.routes])
            for r in settings.routes:
                if r.api_key_env and r.api_key is None:
                    log.warning("upstream_key_missing", route=r.match, env_var=r.api_key_env)
            yield
            log.info("memlane_stopping")
        log.info("memlane_stopped")  # the learner has drained and the store is closed

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/messages", messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", routes.list_models, methods=["GET"]),
            Route("/v1/memories", memories_collection, methods=["GET", "POST"]),
            Route("/v1/memories/export", export_memories, methods=["GET"]),
            Route("/v1/memories/import", import_memories, methods=["POST"]),
            Route("/v1/memories/wipe", wipe_memories, methods=["POST"]),
            Route("/v1/memories/{memory_id}", memory_item, methods=["GET", "PATCH", "DELETE"]),
            Route("/healthz", routes.healthz, methods=["GET"]),
            Route("/readyz", routes.readyz, methods=["GET"]),
            Route("/metrics", routes.metrics, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            *learner_routes(),
            *feedback_routes(),
            Route("/v1/interactions", list_interactions, methods=["GET"]),
            Route("/v1/adapters", list_adapters, methods=["GET"]),
            *ui_routes(),
        ],
        middleware=[
            Middleware(RequestContextMiddleware, metrics=metrics, max_body_bytes=settings.max_request_bytes),
            Middleware(KeyCheckMiddleware),  # scrypt key checks off the event loop
        ],
        exception_handlers={HTTPException: _http_exception, ProxyError: _proxy_error},
        lifespan=lifespan,
    )


# Small pools: httpcore scans every pooled connection per request (see proxy/transport.py).
UPSTREAM_POOL_SHARDS = 32


@contextlib.asynccontextmanager
async def _http_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    timeout = httpx.Timeout(settings.upstream_timeout_s, connect=settings.upstream_connect_timeout_s)
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=128, keepalive_expiry=30)
    transport = ShardedTransport.pooled(UPSTREAM_POOL_SHARDS, limits=limits)
    async with httpx.AsyncClient(timeout=timeout, transport=transport, trust_env=False) as client:
        yield client


def build_embedder(settings: Settings) -> Embedder:
    if settings.embedder == "hash":
        return HashEmbedder()
    return MiniLMEmbedder(cache_dir=settings.model_cache, backend=settings.embedder_backend,
                          threads=settings.torch_threads)


def open_store(settings: Settings, emb: Embedder, **options: Any) -> MemoryStore:
    """The store at `settings.database`, with its key and tier policy."""
    key = settings.database_key.get_secret_value() if settings.database_key else None
    policy = TierPolicy(short_term_ttl=timedelta(hours=settings.short_term_ttl_hours))
    options.setdefault("view_rows", settings.memory_view_rows)
    options.setdefault("done_jobs_kept", timedelta(hours=settings.learner_keep_done_hours))
    return MemoryStore.open(settings.database, embedder=emb, encryption_key=key, tier_policy=policy, **options)


def _open_store(settings: Settings, emb: Embedder) -> MemoryStore | None:
    try:
        return open_store(settings, emb)
    except Exception as exc:  # chat keeps working without memory; readyz and headers say so
        log.error("memory_store_unavailable", database=str(settings.database), error=repr(exc))
        return None


def _local_model(settings: Settings) -> Any:
    """SmolLM2 (or `local_model_dir`), or the NML/EM model when a checkpoint is configured."""
    if settings.nml_checkpoint is not None:
        from adapters.nml import NMLChatModel

        return NMLChatModel(checkpoint=settings.nml_checkpoint, store_root=settings.nml_state_dir,
                            name=settings.local_model_name)
    return LocalModel(cache_dir=settings.model_cache, model_dir=settings.local_model_dir,
                      name=settings.local_model_name)


def _plm_context(settings: Settings, model: Any) -> Any:
    """The personal model's context step of chat requests (`plm_context`): the personal model
    (each user's live adapter) when `plm` is on, else the plain local model."""
    if settings.plm_context != "on" or not isinstance(model, LocalModel):
        return None
    from adapters.plm.context import LocalContextGenerator, PLMContext

    generator = LocalContextGenerator(model, adapter_for=getattr(model, "adapter_for", None))  # personal adapters
    return PLMContext(generator, budget_s=settings.plm_context_budget_ms / 1000)


def _adapter_memories(personal: Any) -> Any:
    """user id -> what the user's live adapter was trained on (the egress policy's check on the
    personal model's context); None without personal adapters."""
    registry = getattr(personal, "registry", None)
    if registry is None:
        return None

    def trained_on(user_id: str) -> AdapterTraining | None:
        live = registry.live(user_id)
        return AdapterTraining(live.memory_ids, live.teacher_requests) if live is not None else None

    return trained_on


def _personal_model(settings: Settings, the_store: MemoryStore | None, given: Any, stack: Any) -> Any:
    """The personal model (`plm`, docs/plm.md) when enabled or passed in. The store's delete and
    wipe hooks keep its adapters in step: a deleted memory makes them stale, a wipe deletes them."""
    if given is None and not settings.plm:
        return None
    from adapters.plm import AdapterRegistry, PersonalModel, follow_store

    personal = given
    if personal is None:
        key = settings.adapter_master_key.get_secret_value() if settings.adapter_master_key else None
        personal = PersonalModel(
            registry=AdapterRegistry(settings.plm_dir, master_key=key), cache_dir=settings.model_cache,
            model_dir=settings.local_model_dir, name=settings.local_model_name, device=settings.plm_device,
        )
        stack.callback(personal.close)
    if the_store is not None:
        follow_store(the_store, personal.registry, on_wipe=personal.unload_user)
    return personal


def _start_plm_updates(settings: Settings, the_store: MemoryStore | None, personal: Any, metrics: Metrics,
                       stack: contextlib.AsyncExitStack) -> Any:
    """The learner's training requests, trained and gated in the background on a copy of the
    base model (`plm_auto_update`, docs/plm.md); stopped, a running update with it, before the
    store closes."""
    if not (settings.plm and settings.plm_auto_update) or the_store is None or personal is None:
        return None
    from adapters.plm import BaseSpec, PLMRuntime, UpdateConfig, UpdateScheduler

    spec = BaseSpec(cache_dir=settings.model_cache, model_dir=settings.local_model_dir,
                    name=settings.local_model_name, device=settings.plm_device)
    scheduler = UpdateScheduler(
        the_store, personal.registry, lambda: PLMRuntime.load(spec),
        config=UpdateConfig.from_dict(settings.plm_training), threads=settings.plm_update_threads,
        min_gap_s=settings.plm_update_min_gap_s, poll_s=settings.plm_update_poll_s,
        observer=_PLMUpdateObserver(metrics),
    )
    scheduler.start()
    stack.push_async_callback(asyncio.to_thread, scheduler.stop)
    return scheduler


def _with_personal(upstreams: dict[str, ChatUpstream], personal: Any) -> dict[str, ChatUpstream]:
    if personal is not None and "plm" not in upstreams:
        upstreams = {**upstreams, "plm": PersonalUpstream(personal)}
    return upstreams


def _nml_feed(model: Any) -> Any:
    """The NML model's per-user `feed`, when the local model is one."""
    return getattr(model, "feed", None) if type(model).__name__ == "NMLChatModel" else None


def _start_learner(settings, the_store, emb, metrics, stack, *, nml_feed=None, local_model=None, journal=False,  # type: ignore[no-untyped-def]
                   preloaded=None):
    if the_store is None:
        return DroppingSink(metrics)
    # Beside the database this app opened: acknowledged interactions survive a killed process.
    # Not beside an encrypted database: the journal is plain text.
    journal = journal and str(settings.database) != ":memory:" and settings.database_key is None
    journal_dir = Path(f"{settings.database}.journal") if journal else None
    inprocess = settings.learner == "inprocess"
    learner = LearnerWorker(the_store, emb, maxsize=settings.log_queue_size, observer=_Observer(metrics),
                            maintenance_interval_s=settings.maintenance_interval_s, nml_feed=nml_feed,
                            extractor=build_extractor(settings, local_model) if inprocess else extract_facts,
                            run_jobs=inprocess, retry=retry_policy(settings), triggers=trigger_policy(settings),
                            consolidate=find_consolidator(), lease_for=timedelta(seconds=settings.learner_lease_s),
                            journal=InteractionJournal(journal_dir) if journal_dir else None,
                            # learning runs preload the user's frequent domains into the cache
                            preload=Preloader(preloaded) if preloaded is not None else None)
    learner.start()
    stack.callback(learner.stop)
    return learner


def _warm_up(settings: Settings, emb: Embedder, model: LocalModel, the_store: MemoryStore | None) -> list:
    """Load the models in the background so start-up is instant and the first request is not."""
    jobs = []
    if settings.memory and the_store is not None and hasattr(emb, "load"):
        jobs.append(emb.load)
    if settings.memory and the_store is not None and settings.memory_view_preload:
        jobs.append(the_store.preload_views)  # recently active users' views, built one by one
    if settings.preload_local_model and any(r.provider == "local" for r in settings.routes):
        jobs.append(model.load)
    threads = []
    for job in jobs:
        t = threading.Thread(target=_quietly(job), name=f"memlane-warmup-{job.__qualname__}", daemon=True)
        t.start()
        threads.append(t)
    return threads


def _quietly(job):  # type: ignore[no-untyped-def]
    def run() -> None:
        try:
            job()
        except Exception as exc:  # readyz reports it; requests retry the load and get a clear error
            log.error("warmup_failed", job=job.__qualname__, error=repr(exc))

    return run


def _upstreams(settings: Settings, client: httpx.AsyncClient, model: LocalModel) -> dict[str, ChatUpstream]:
    providers = {r.provider for r in settings.routes}
    out: dict[str, ChatUpstream] = {}
    if "local" in providers:
        out["local"] = LocalUpstream(model)
    if "openai" in providers:
        out["openai"] = OpenAIUpstream(client, retries=settings.upstream_retries)
    for provider in ("anthropic", "ollama"):
        if provider in providers:
            out[provider] = LiteLLMUpstream(provider, timeout_s=settings.upstream_timeout_s)
    return out


class _Observer:
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def queue_depth(self, depth: int) -> None:
        self.m.log_queue_depth.set(depth)

    def dropped(self) -> None:
        self.m.log_rows_dropped.inc()

    def written(self, rows: int) -> None:
        self.m.log_rows_written.inc(rows)

    def extracted(self, memories: int) -> None:
        self.m.memories_extracted.inc(memories)

    def job_finished(self, outcome: str) -> None:
        self.m.learner_jobs.labels(outcome=outcome).inc()


class _PLMUpdateObserver:
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def started(self) -> None:
        self.m.plm_updates_started.inc()

    def finished(self, outcome: str, seconds: float) -> None:
        self.m.plm_updates.labels(outcome=outcome).inc()
        self.m.plm_update_seconds.observe(seconds)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        err: ProxyError = NotFound(f"Unknown path {request.url.path}.", code="unknown_url")
    elif exc.status_code == 405:
        err = ProxyError(f"Method {request.method} is not allowed on {request.url.path}.",
                         status=405, code="method_not_allowed")
        err.type = "invalid_request_error"
    else:
        err = ProxyError(str(exc.detail), status=exc.status_code)
    if request.url.path.startswith("/v1/messages"):  # Anthropic clients read Anthropic's error shape
        return anthropic_error_response(err)
    return error_response(err)


async def _proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    return error_response(exc)
