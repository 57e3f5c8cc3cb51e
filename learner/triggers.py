"""When the learner consolidates what it learned (seed 004's accumulation phase).

A user's learning run is due after `every` interactions learned since their last run
("interactions"), after `period` (24 h) with any learned since then ("schedule"), or when the
user asks (`POST /v1/learn`, `memlane learn`: "request"). A run promotes, expires and decays
memories by the tier rules (`memory.tiers.run_maintenance` through `store.maintain`),
consolidates the user's memories (`learner.dream.consolidate`, when that step is installed),
preloads the context of the user's frequent domains (`learner.dream.Preloader`, when the
process has a preload cache its requests read), and queues a training request for the user's
personal model (a `training_requests` row the trainer consumes). The counters live in the
store, and the clock is the store's, so a test covers a day in milliseconds.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import timedelta
from typing import Any

import structlog

from memory import MemoryStore

__all__ = ["Consolidator", "LearnRun", "Preload", "TriggerPolicy", "find_consolidator", "learn", "run_due"]

log = structlog.get_logger("memlane.learner")

Consolidator = Callable[..., Any]  # consolidate(store, user_id, *, clock) -> report
Preload = Callable[..., Any]  # preload(store, user_id, *, clock) -> report (learner.dream.Preloader)


@dataclass(frozen=True, slots=True)
class TriggerPolicy:
    every: int = 10  # interactions learned per user
    period: timedelta = timedelta(hours=24)
    min_gap: timedelta = timedelta(0)  # at most one run per user this often (the server: 60 s)


@dataclass
class LearnRun:
    user_id: str
    reason: str  # interactions | schedule | request
    promotion: dict[str, Any] = field(default_factory=dict)
    consolidation: dict[str, Any] | None = None  # None: no consolidation step installed
    preloading: dict[str, Any] | None = None  # None: no preload cache in this process
    training_request: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"object": "learner.run", "user": self.user_id, "reason": self.reason,
                "promotion": self.promotion, "consolidation": self.consolidation,
                "preloading": self.preloading, "training_request": self.training_request}


def find_consolidator() -> Consolidator | None:
    """`learner.dream.consolidate` if that module is installed: the consolidation hook."""
    try:
        module = importlib.import_module("learner.dream")
    except ModuleNotFoundError as exc:
        if exc.name != "learner.dream":
            raise
        return None
    return getattr(module, "consolidate", None)


def learn(store: MemoryStore, user_id: str, reason: str, *, consolidate: Consolidator | None,
          preload: Preload | None = None, maintenance: dict[str, Any] | None = None) -> LearnRun:
    """One learning run for a user. `maintenance`: a promotion report already made in this
    round (promotion is one pass over every user), so several due users share one pass.
    `preload` runs after consolidation, so the cached context is built from the merged memories."""
    run = LearnRun(user_id, reason)
    previous = (store.learner_user(user_id) or {}).get("last_run_at")
    run.promotion = maintenance if maintenance is not None else _report(store.maintain())
    if consolidate is not None:
        try:
            # Only what changed since the user's last run can have become a duplicate.
            run.consolidation = _report(consolidate(store, user_id, clock=store.clock, since=previous))
        except Exception as exc:  # reported in the run, logged; promotion and training go on
            log.error("job_failed", step="consolidate", user_hash=_hash(user_id), error=repr(exc))
            run.consolidation = {"error": type(exc).__name__}
    if preload is not None:
        try:
            run.preloading = _report(preload(store, user_id, clock=store.clock))
        except Exception as exc:  # like consolidation: reported, logged, the run goes on
            log.error("job_failed", step="preload", user_hash=_hash(user_id), error=repr(exc))
            run.preloading = {"error": type(exc).__name__}
    run.training_request = store.request_training(user_id, reason).to_dict()
    log.info("learn_done", user_hash=_hash(user_id), reason=reason,
             training_request=run.training_request["id"], consolidated=run.consolidation is not None,
             preloaded=run.preloading is not None)
    return run


def run_due(store: MemoryStore, policy: TriggerPolicy, *, consolidate: Consolidator | None,
            preload: Preload | None = None) -> list[LearnRun]:
    """Every user whose run is due by count or by time: one promotion pass, then each user."""
    due = store.learner_users_due(every=policy.every, period=policy.period, min_gap=policy.min_gap)
    if not due:
        return []
    maintenance = _report(store.maintain())
    runs = []
    for user_id, reason in due:
        try:
            runs.append(learn(store, user_id, reason, consolidate=consolidate, preload=preload,
                              maintenance=maintenance))
        except Exception as exc:  # one user's failed run must not stop the others; retried next round
            log.error("job_failed", step="learn", user_hash=_hash(user_id), error=repr(exc))
    return runs


def _report(report: object) -> dict[str, Any]:
    if report is None:
        return {}
    if is_dataclass(report) and not isinstance(report, type):
        return asdict(report)
    if isinstance(report, dict):
        return report
    return {"result": repr(report)}


def _hash(user_id: str) -> str:
    return hashlib.sha256(user_id.encode()).hexdigest()[:12]
