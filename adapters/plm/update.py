"""One incremental update of a user's personal adapter: data, training, gate, registry.

`run_update(store, user_id, ...)`:
1. Reads the user's current memories and their teacher log from the store.
2. Starts from the live adapter (incremental) or a fresh one. Memories the live adapter was
   not trained on get `paraphrases` question phrasings each; memories it already knows get
   `rehearsal` phrasings, so the update keeps them while it learns the new ones.
3. Adds sequence-level distillation examples from teacher answers in the log (with soft
   targets where the log or a local scorer provides them) and trains with the KL-to-base guard.
4. Runs the gate (`adapters.plm.gate`); the registry stores the version as accepted (now live)
   or rejected (the previous one stays live) with the report and reasons.

`run_requested_updates` does this for each pending `training_requests` row the learner wrote.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from adapters.plm.data import (
    Example,
    TeacherScorer,
    qa_examples,
    replay_text,
    teacher_examples,
    text_windows,
)
from adapters.plm.facts import QAPair, corrections_of, fact_of, qa_pairs
from adapters.plm.gate import GateConfig, GateReport, evaluate
from adapters.plm.model import LoRAConfig, PLMRuntime
from adapters.plm.registry import (
    ACCEPTED,
    REJECTED,
    AdapterRegistry,
    AdapterVersion,
    reconcile,
)
from adapters.plm.train import TrainConfig, train_adapter
from memory import MemoryStore

log = structlog.get_logger("memlane.plm.update")

CANDIDATE = "candidate"  # the adapter name a candidate trains under
MAX_MEMORIES = 2000


@dataclass(frozen=True, slots=True)
class UpdateConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    paraphrases: int = 6  # TRAIN phrasings per memory the parent adapter has not seen
    rehearsal: int = 2  # per memory it was already trained on
    replay_windows: int = 64  # replay windows cycled through by the KL guard
    teacher_rows: int = 200  # newest logged interactions read for distillation
    max_teacher_examples: int = 32


@dataclass
class UpdateResult:
    user_id: str
    version: AdapterVersion | None  # None: nothing to train on
    seconds: float = 0.0
    report: GateReport | None = None

    @property
    def accepted(self) -> bool:
        return self.version is not None and self.version.status == ACCEPTED

    @property
    def reasons(self) -> list[str]:
        return self.version.reasons if self.version is not None else ["no memories to learn"]


def training_examples(
    runtime: PLMRuntime, store: MemoryStore, user_id: str, known: set[str], config: UpdateConfig,
    *, scorer: TeacherScorer | None = None, pairs: list[QAPair] | None = None,
) -> tuple[list[Example], list[str]]:
    """(examples, memory ids trained on). `pairs` replaces the memory QA pairs when given."""
    memories = store.list(user_id, limit=MAX_MEMORIES)
    if pairs is None:
        fresh = [m for m in memories if m.id not in known]
        seen = [m for m in memories if m.id in known]
        pairs = qa_pairs(fresh, paraphrases=config.paraphrases) + qa_pairs(
            seen, paraphrases=config.rehearsal, offset=len(known)
        )
    examples = qa_examples(runtime.tokenizer, pairs, max_tokens=config.train.max_tokens)
    rows = store.interactions(user_id=user_id, limit=config.teacher_rows)
    teacher = teacher_examples(runtime.tokenizer, rows, max_tokens=config.train.max_tokens, scorer=scorer)
    examples += teacher[: config.max_teacher_examples]
    return examples, sorted({p.memory_id for p in pairs})


def run_update(
    store: MemoryStore, user_id: str, *, runtime: PLMRuntime, registry: AdapterRegistry,
    config: UpdateConfig | None = None, scorer: TeacherScorer | None = None,
    pairs: list[QAPair] | None = None, on_step: Callable[[int, int], None] | None = None,
) -> UpdateResult:
    """Train, gate and register one new adapter version for the user."""
    config = config or UpdateConfig()
    started = time.perf_counter()
    reconcile(store, registry, user_id)  # never train on from an adapter that saw a deleted memory
    parent = registry.live(user_id)
    if parent is not None and LoRAConfig.from_dict(parent.lora) != runtime.lora:
        parent = None  # another adapter shape: start afresh
    known = set(parent.memory_ids) if parent else set()
    examples, memory_ids = training_examples(runtime, store, user_id, known, config, scorer=scorer, pairs=pairs)
    if not examples:
        return UpdateResult(user_id, None, time.perf_counter() - started)
    if parent is not None:
        runtime.load_adapter(CANDIDATE, registry.load_weights(user_id, parent.version))
    else:
        runtime.fresh_adapter(CANDIDATE, seed=config.train.seed)
    replay = text_windows(runtime.tokenizer, replay_text(), count=config.replay_windows,
                          length=config.train.replay_tokens, seed=config.train.seed)
    stats = train_adapter(runtime, CANDIDATE, examples, replay, config.train, on_step=on_step)

    current = store.list(user_id, limit=MAX_MEMORIES)
    history = store.list(user_id, limit=MAX_MEMORIES, include_history=True)
    facts = [f for f in (fact_of(m) for m in current) if f is not None]
    report = evaluate(runtime, CANDIDATE, facts, corrections_of(current, history), config.gate)
    record = AdapterVersion(
        version=0, created_at="", status=ACCEPTED if report.passed else REJECTED, base=runtime.name,
        memory_ids=memory_ids, parent=parent.version if parent else None, reasons=report.reasons,
        report=report.to_dict(), lora=runtime.lora.to_dict(),
        training={**config.train.to_dict(), "steps": stats.steps, "examples": stats.examples,
                  "teacher_examples": sum(e.source == "teacher" for e in examples),
                  "seconds": round(stats.seconds, 2), "last_losses": stats.losses},
    )
    weights = runtime.adapter_weights(CANDIDATE) if report.passed else None
    runtime.drop_adapter(CANDIDATE)
    version = registry.add(user_id, record, weights)
    seconds = time.perf_counter() - started
    log.info("plm_update_done", version=version.version, status=version.status, steps=stats.steps,
             fact_recall=round(report.fact_recall, 3), ppl_drift=round(report.ppl_drift, 4),
             seconds=round(seconds, 1))
    return UpdateResult(user_id, version, seconds, report)


def run_requested_updates(
    store: MemoryStore, *, runtime: PLMRuntime, registry: AdapterRegistry,
    config: UpdateConfig | None = None, limit: int = 10, **options: Any,
) -> list[UpdateResult]:
    """Serves the learner's pending training requests, oldest first, one update each."""
    results = []
    for request in store.training_requests(state="pending", limit=limit):
        store.set_training_state(request.id, "running")
        try:
            result = run_update(store, request.user_id, runtime=runtime, registry=registry, config=config, **options)
        except Exception as exc:  # noqa: BLE001 - one user's failure must not stop the others; the row says why
            log.error("job_failed", step="plm_update", request_id=request.id, error=repr(exc))
            store.set_training_state(request.id, "failed", repr(exc)[:500])
            continue
        rejected = None if result.accepted else "; ".join(result.reasons)
        store.set_training_state(request.id, "done", rejected)
        results.append(result)
    return results
