"""What an adapter is trained on, as token ids: the learner's dataset and replay text.

- The learner's distillation dataset (`learner.datasets.build_dataset`): memory QA pairs (several
  phrasings per fact, weighted by confidence, memory type and feedback) and teacher answers from
  the interactions log (sequence-level distillation; memlane's own local models are not
  teachers). Each example becomes the turns before its answer (`Example.conversation()`: the
  question alone for a memory, the client's conversation for a teacher answer) with the answer
  as the only supervised span, and keeps its weight.
- Soft targets: where the dataset carries the teacher's top log-probabilities per token and
  they line up with this tokenizer's tokens of the answer, or where a local same-tokenizer
  teacher (`LocalTeacher`) scored the answer, the example carries the teacher's top-k
  distribution per answer position.
- Replay text: paragraphs of Python's own reference documentation (`pydoc_data.topics`, shipped
  with CPython, offline). Training keeps the adapted model's next-token distribution close to the
  base's on it; a disjoint set of topics is held out to measure perplexity drift.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from adapters.plm.model import IGNORE, supervised_pair

if TYPE_CHECKING:
    import torch

    from learner.datasets import Example as DatasetExample

__all__ = [
    "Batch", "Example", "LocalTeacher", "SoftTargets", "TeacherScorer", "collate", "dataset_examples",
    "heldout_text", "replay_text", "text_windows",
]


@dataclass(frozen=True, slots=True)
class SoftTargets:
    """The teacher's top-k next-token log-probabilities at each answer position."""

    ids: list[list[int]]  # (A, k) token ids, A = answer length incl. end token
    logprobs: list[list[float]]  # (A, k)


@dataclass(frozen=True, slots=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE outside the answer
    source: str  # "memory" | "teacher"
    memory_id: str | None = None
    soft: SoftTargets | None = None  # aligned with the labelled positions, in order
    weight: float = 1.0  # the dataset's: confidence x type x feedback (memories), feedback (teacher)


class TeacherScorer(Protocol):
    def score(self, prompt: list[int], answer: list[int], *, k: int) -> SoftTargets: ...


def dataset_examples(
    tokenizer: Any, examples: Iterable[DatasetExample], *, max_tokens: int, scorer: TeacherScorer | None = None,
    k: int = 8,
) -> list[Example]:
    """Token-id examples from the learner's dataset examples, in their order. Teacher answers
    get soft targets from their logged top log-probabilities, else from `scorer` when given."""
    out = []
    for example in examples:
        ids, labels = supervised_pair(tokenizer, example.conversation(), example.output, max_tokens=max_tokens)
        soft = None
        if example.source == "teacher":
            reply = [t for t in labels if t != IGNORE]
            soft = logged_soft_targets(tokenizer, example.teacher_logprobs, reply)
            if soft is None and scorer is not None:
                soft = scorer.score(ids[: len(ids) - len(reply)], reply, k=k)
        out.append(Example(ids, labels, example.source, example.memory_id, soft, example.weight))
    return out


def logged_soft_targets(tokenizer: Any, logprobs: Iterable[dict] | None, reply: list[int]) -> SoftTargets | None:
    """Soft targets from the dataset's per-token record (`token`, `logprob`, `top`: [[token,
    logprob], ...]), if its tokens are this tokenizer's.

    Each logged token and each of its alternatives must be one token here, and the logged
    tokens must spell exactly the answer's ids (the end token excepted); otherwise None.
    """
    positions = list(logprobs or ())
    if not positions or len(positions) != len(reply) - 1:
        return None
    ids, lps = [], []
    for position, expected in zip(positions, reply[:-1], strict=True):
        if _single_id(tokenizer, position.get("token")) != expected:
            return None
        alts = [(_single_id(tokenizer, token), lp) for token, lp in position.get("top") or []]
        alts = [(i, float(lp)) for i, lp in alts if i is not None and isinstance(lp, int | float)]
        if not alts:
            alts = [(expected, float(position.get("logprob") or 0.0))]
        ids.append([i for i, _ in alts])
        lps.append([lp for _, lp in alts])
    ids.append([reply[-1]])  # the end of the turn: certain
    lps.append([0.0])
    return SoftTargets(ids, lps)


def _single_id(tokenizer: Any, token: Any) -> int | None:
    if not isinstance(token, str):
        return None
    found = tokenizer(token, add_special_tokens=False)["input_ids"]
    return found[0] if len(found) == 1 else None


class LocalTeacher:
    """A same-tokenizer causal LM run here, scoring answers into top-k soft targets."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def score(self, prompt: list[int], answer: list[int], *, k: int) -> SoftTargets:
        import torch

        device = next(self.model.parameters()).device
        ids = torch.tensor([[*prompt, *answer]], device=device)  # (1, T)
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0].float()  # (T, V)
        # position t predicts token t + 1: the answer's tokens are predicted from len(prompt) - 1 on
        start = len(prompt) - 1
        logp = torch.log_softmax(logits[start : start + len(answer)], dim=-1)  # (A, V)
        top = torch.topk(logp, k, dim=-1)
        return SoftTargets(top.indices.tolist(), top.values.tolist())


# -- replay and held-out text ---------------------------------------------------------------------

HELDOUT_EVERY = 4  # every 4th topic (in sorted order) is held out for the perplexity check


def _topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _paragraphs(texts: Iterable[str], *, min_chars: int = 200) -> list[str]:
    out = []
    for text in texts:
        for para in text.split("\n\n"):
            para = " ".join(para.split())
            if len(para) >= min_chars and para.count(">>>") == 0:
                out.append(para)
    return out


def replay_text() -> list[str]:
    """Paragraphs the KL-to-base guard is computed on."""
    return _paragraphs(t for i, t in enumerate(_topics()) if i % HELDOUT_EVERY != 0)


def heldout_text() -> list[str]:
    """Paragraphs never trained on: the general-perplexity check."""
    return _paragraphs(t for i, t in enumerate(_topics()) if i % HELDOUT_EVERY == 0)


def text_windows(tokenizer: Any, paragraphs: list[str], *, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` windows of `length` tokens, each from one paragraph (chosen deterministically)."""
    rng = random.Random(seed)
    order = list(range(len(paragraphs)))
    rng.shuffle(order)
    out = []
    for i in order:
        ids = tokenizer(paragraphs[i], add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
            if len(out) == count:
                break
    return out


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE on prompt and padding
    attention_mask: torch.Tensor  # (B, T)
    soft: list[tuple[int, int, SoftTargets]] = field(default_factory=list)  # (row, first answer pos, targets)
    weights: torch.Tensor | None = None  # (B,) each row's example weight; None: all 1


def collate(examples: list[Example], pad_id: int, device: Any) -> Batch:
    """Right-padded batch; soft targets keep the row and where that row's answer starts."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    soft = []
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
        if e.soft is not None:
            first = next(i for i, t in enumerate(e.labels) if t != IGNORE)
            soft.append((row, first, e.soft))
    weights = torch.tensor([e.weight for e in examples], dtype=torch.float32)  # (B,)
    return Batch(ids.to(device), labels.to(device), mask.to(device), soft, weights.to(device))

