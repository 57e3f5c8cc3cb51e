"""One incremental update of a user's personal adapter: data, training, gate, registry.

`run_update(store, user_id, ...)`:
1. Builds the user's distillation dataset with the learner (`learner.datasets.build_dataset`:
   memory QA pairs with paraphrases, teacher answers from the log, weights from confidence,
   memory type and feedback; deterministic and versioned).
2. Starts from the live adapter (incremental) or a fresh one. Memories the live adapter was
   not trained on get `paraphrases` of their dataset questions; memories it already knows get
   `rehearsal` of them (by default all: the parent's whole training set is replayed; with 2 of
   6, the benchmark kept 80% of the earlier facts, with all 6, 92.5%), so the update keeps them
   while it learns the new ones. Teacher answers
   (with soft targets where the dataset or a local scorer provides them) come on top, and the
   KL-to-base guard keeps general text unchanged. No example asks a question the gate will
   probe with: those stay held out.
3. Runs the gate (`adapters.plm.gate`) on the facts it was taught; the registry stores the
   version as accepted (now live) or rejected (the previous one stays live) with the report,
   the reasons and the dataset version it was trained from.

`run_request` does this for one pending `training_requests` row the learner wrote and records
the outcome on it; `run_requested_updates` (the CLI) takes them all, oldest first; the server's
`adapters.plm.scheduler.UpdateScheduler` takes them one at a time in the background.
`should_stop` lets the server stop an update between steps: nothing is registered then, and the
request goes back to pending.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from adapters.plm.data import (
    Example,
    TeacherScorer,
    dataset_examples,
    replay_text,
    text_windows,
)
from adapters.plm.facts import corrections_of, fact_of, probes
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

if TYPE_CHECKING:
    from learner.datasets import Dataset
    from learner.datasets import Example as DatasetExample
    from memory import TrainingRequest

log = structlog.get_logger("memlane.plm.update")

CANDIDATE = "candidate"  # the adapter name a candidate trains under
MAX_MEMORIES = 2000


class UpdateCancelled(Exception):
    """The update was stopped (the server is shutting down) before it registered a version."""


@dataclass(frozen=True, slots=True)
class UpdateConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    paraphrases: int = 6  # dataset questions per memory the parent adapter has not seen
    rehearsal: int = 6  # per memory it was already trained on; = paraphrases: replay all it saw
    replay_windows: int = 64  # replay windows cycled through by the KL guard
    teacher_rows: int = 200  # newest logged interactions the dataset reads for distillation
    max_teacher_examples: int = 32  # the heaviest (corrected, well-rated) first

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UpdateConfig:
        """From a settings table (`plm_training`): top-level fields plus `train` and `gate`
        tables; an unknown name raises TypeError naming it."""
        data = dict(data)
        train, gate = TrainConfig(**data.pop("train", {})), GateConfig(**data.pop("gate", {}))
        return cls(train=train, gate=gate, **data)


@dataclass
class UpdateResult:
    user_id: str
    version: AdapterVersion | None  # None: nothing to train on, or the update failed
    seconds: float = 0.0
    report: GateReport | None = None
    error: str | None = None  # why the update failed (no version then)

    @property
    def accepted(self) -> bool:
        return self.version is not None and self.version.status == ACCEPTED

    @property
    def outcome(self) -> str:
        """accepted | rejected | failed | empty (nothing to train on)."""
        if self.error is not None:
            return "failed"
        return "empty" if self.version is None else self.version.status

    @property
    def reasons(self) -> list[str]:
        if self.error is not None:
            return [self.error]
        return self.version.reasons if self.version is not None else ["no memories to learn"]


def select_examples(dataset: Dataset, known: set[str], config: UpdateConfig,
                    held_out: set[str]) -> list[DatasetExample]:
    """The dataset examples this update trains on: `paraphrases` per new memory, `rehearsal`
    per known one (rotated by how many it knows, so rehearsals vary between updates), then the
    heaviest teacher answers; never one asking a held-out question."""
    by_memory: dict[str, list[DatasetExample]] = {}
    teacher = []
    for example in dataset.examples:
        if example.instruction in held_out:
            continue
        if example.source == "memory" and example.memory_id is not None:
            by_memory.setdefault(example.memory_id, []).append(example)
        else:
            teacher.append(example)
    chosen: list[DatasetExample] = []
    for memory_id, group in by_memory.items():
        if memory_id in known:
            chosen += [group[(len(known) + j) % len(group)] for j in range(min(config.rehearsal, len(group)))]
        else:
            chosen += group[: config.paraphrases]
    teacher.sort(key=lambda e: (-e.weight, e.id))
    return chosen + teacher[: config.max_teacher_examples]


def build(store: MemoryStore, user_id: str, config: UpdateConfig) -> Dataset:
    """The learner's dataset for this update (imported here: the learner package is heavy)."""
    from learner.datasets import build_dataset

    return build_dataset(store, user_id, seed=config.train.seed, paraphrases=config.paraphrases,
                         max_interactions=config.teacher_rows)


def _stopper(should_stop: Callable[[], bool] | None) -> Callable[[], None]:
    def check() -> None:
        if should_stop is not None and should_stop():
            raise UpdateCancelled("the update was stopped before it registered a version")

    return check


def run_update(
    store: MemoryStore, user_id: str, *, runtime: PLMRuntime, registry: AdapterRegistry,
    config: UpdateConfig | None = None, scorer: TeacherScorer | None = None, dataset: Dataset | None = None,
    on_step: Callable[[int, int], None] | None = None, should_stop: Callable[[], bool] | None = None,
) -> UpdateResult:
    """Train, gate and register one new adapter version for the user. `dataset` replaces the
    learner's dataset built from the store (tests); `should_stop` is polled between training
    steps and gate batches and raises UpdateCancelled, registering nothing."""
    config = config or UpdateConfig()
    check = _stopper(should_stop)
    started = time.perf_counter()
    reconcile(store, registry, user_id)  # never train on from an adapter that saw a deleted memory
    parent = registry.live(user_id)
    if parent is not None and LoRAConfig.from_dict(parent.lora) != runtime.lora:
        parent = None  # another adapter shape: start afresh
    known = set(parent.memory_ids) if parent else set()
    dataset = dataset if dataset is not None else build(store, user_id, config)
    taught = {e.memory_id for e in dataset.examples if e.memory_id is not None}
    current = [m for m in store.list(user_id, limit=MAX_MEMORIES) if m.id in taught]
    facts = [f for f in (fact_of(m) for m in current) if f is not None]
    held_out = {q for f in facts for q in probes(f)}
    chosen = select_examples(dataset, known, config, held_out)
    examples = dataset_examples(runtime.tokenizer, chosen, max_tokens=config.train.max_tokens, scorer=scorer)
    if not examples:
        return UpdateResult(user_id, None, time.perf_counter() - started)
    history = store.list(user_id, limit=MAX_MEMORIES, include_history=True)
    try:
        report, stats, weights = _train_and_gate(runtime, registry, user_id, parent, examples, facts,
                                                 corrections_of(current, history), config, on_step, check)
    finally:
        runtime.drop_adapter(CANDIDATE)
    check()  # the last moment to stop: from here the version is registered whole
    memory_ids = sorted({e.memory_id for e in chosen if e.memory_id is not None})
    if _deleted(store, user_id, memory_ids):  # while it trained (in the server): never serve them
        log.info("plm_update_discarded", why="memories deleted during the update")
        return UpdateResult(user_id, None, time.perf_counter() - started, report,
                            error="memories it was trained on were deleted during the update")
    record = AdapterVersion(
        version=0, created_at="", status=ACCEPTED if report.passed else REJECTED, base=runtime.name,
        memory_ids=memory_ids,
        # trained from the parent's weights: what the parent distilled is in these too
        teacher_requests=sorted({e.request_id for e in chosen if e.source == "teacher" and e.request_id}
                                | set(parent.teacher_requests if parent else ())),
        parent=parent.version if parent else None, reasons=report.reasons, report=report.to_dict(),
        lora=runtime.lora.to_dict(),
        training={**config.train.to_dict(), "steps": stats.steps, "examples": stats.examples,
                  "teacher_examples": sum(e.source == "teacher" for e in examples), "dataset": dataset.version,
                  "seconds": round(stats.seconds, 2), "last_losses": stats.losses},
    )
    version = registry.add(user_id, record, weights)
    seconds = time.perf_counter() - started
    log.info("plm_update_done", version=version.version, status=version.status, steps=stats.steps,
             dataset=dataset.version, fact_recall=round(report.fact_recall, 3),
             ppl_drift=round(report.ppl_drift, 4), seconds=round(seconds, 1))
    return UpdateResult(user_id, version, seconds, report)


def _deleted(store: MemoryStore, user_id: str, memory_ids: list[str]) -> bool:
    present = {e.id for e in store.get_many(user_id, memory_ids, relations=False)}
    return bool(set(memory_ids) - present)


def _train_and_gate(
    runtime: PLMRuntime, registry: AdapterRegistry, user_id: str, parent: AdapterVersion | None,
    examples: list[Example], facts: list, corrections: list, config: UpdateConfig,
    on_step: Callable[[int, int], None] | None, check: Callable[[], None],
) -> tuple[GateReport, Any, Any]:
    """(gate report, training stats, the candidate's weights when it passed)."""
    if parent is not None:
        runtime.load_adapter(CANDIDATE, registry.load_weights(user_id, parent.version))
    else:
        runtime.fresh_adapter(CANDIDATE, seed=config.train.seed)
    replay = text_windows(runtime.tokenizer, replay_text(), count=config.replay_windows,
                          length=config.train.replay_tokens, seed=config.train.seed)

    def step(done: int, total: int) -> None:
        if on_step is not None:
            on_step(done, total)
        check()

    stats = train_adapter(runtime, CANDIDATE, examples, replay, config.train, on_step=step)
    report = evaluate(runtime, CANDIDATE, facts, corrections, config.gate, check=check)
    weights = runtime.adapter_weights(CANDIDATE) if report.passed else None
    return report, stats, weights


def run_request(
    store: MemoryStore, request: TrainingRequest, *, runtime: PLMRuntime, registry: AdapterRegistry,
    config: UpdateConfig | None = None, **options: Any,
) -> UpdateResult:
    """Serves one training request and records the outcome on it: done (with the gate's reasons
    when the version was rejected), failed with the error (or when a memory it trained on was
    deleted meanwhile: nothing is registered then), or back to pending when the update was
    stopped (UpdateCancelled is raised again for the caller)."""
    store.set_training_state(request.id, "running")
    try:
        result = run_update(store, request.user_id, runtime=runtime, registry=registry, config=config, **options)
    except UpdateCancelled:
        store.set_training_state(request.id, "pending")
        log.info("plm_update_cancelled", request_id=request.id)
        raise
    except Exception as exc:  # noqa: BLE001 - one user's failure must not stop the others; the row says why
        log.error("job_failed", step="plm_update", request_id=request.id, error=repr(exc))
        store.set_training_state(request.id, "failed", repr(exc)[:500])
        return UpdateResult(request.user_id, None, error=repr(exc)[:500])
    state = "failed" if result.error is not None else "done"
    store.set_training_state(request.id, state, None if result.accepted else "; ".join(result.reasons))
    return result


def run_requested_updates(
    store: MemoryStore, *, runtime: PLMRuntime, registry: AdapterRegistry,
    config: UpdateConfig | None = None, limit: int = 10, **options: Any,
) -> list[UpdateResult]:
    """Serves the learner's pending training requests, oldest first, one update each; returns
    the results of those that did not fail (a failed one is marked failed with its error)."""
    results = []
    for request in store.training_requests(state="pending", limit=limit):
        result = run_request(store, request, runtime=runtime, registry=registry, config=config, **options)
        if result.error is None:
            results.append(result)
    return results
