"""The user's personal regression tests: what a new adapter must pass before it goes live.

1. Facts it must know: each current memory a question pattern reads is asked with a PROBE
   phrasing (never trained on); the greedy answer must contain the fact's value. At least
   `min_fact_recall` of them must be right.
2. Corrections it must honour: where a memory superseded another, the answer must give the
   new value and not the old one. Every one must pass.
3. General perplexity drift: perplexity on held-out reference text (never trained on) may
   rise by at most `max_ppl_drift` (3%) over the base model's.

A failed check rejects the adapter with the reasons recorded; the previous adapter stays live.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from adapters.plm.data import heldout_text, text_windows
from adapters.plm.facts import Correction, Fact, contains_value, probes
from adapters.plm.model import BLANK_ADAPTER, PLMRuntime, prompt_ids

Check = Callable[[], None]  # called between batches; raises to stop


@dataclass(frozen=True, slots=True)
class GateConfig:
    min_fact_recall: float = 0.9  # share of probed facts the answer must state
    max_ppl_drift: float = 0.03  # held-out perplexity may rise by at most 3% over the base
    heldout_windows: int = 24  # windows of held-out text for the perplexity check
    heldout_tokens: int = 128
    max_new_tokens: int = 24  # per probe answer
    probes_per_fact: int = 1  # 1: the first PROBE phrasing; 2: both (all must be right)


@dataclass
class GateReport:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    facts: int = 0
    facts_known: int = 0
    facts_missed: list[str] = field(default_factory=list)  # memory ids
    corrections: int = 0
    corrections_failed: list[str] = field(default_factory=list)  # memory ids
    ppl_base: float = 0.0
    ppl_adapted: float = 0.0

    @property
    def fact_recall(self) -> float:
        return self.facts_known / self.facts if self.facts else 1.0

    @property
    def ppl_drift(self) -> float:
        return self.ppl_adapted / self.ppl_base - 1 if self.ppl_base else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(fact_recall=round(self.fact_recall, 4), ppl_drift=round(self.ppl_drift, 5))
        return out


def activate(runtime: PLMRuntime, adapter: str | None) -> Any:
    """The PEFT model with `adapter` active (None: the blank adapter, i.e. the base)."""
    model = runtime.peft_model
    model.set_adapter(adapter or BLANK_ADAPTER)
    return model


def answers(runtime: PLMRuntime, adapter: str | None, questions: list[str], *,
            max_new_tokens: int = 24, batch_size: int = 16, check: Check | None = None) -> list[str]:
    """Greedy answers to single-turn questions, in batches (left-padded)."""
    import torch

    model, tok = activate(runtime, adapter), runtime.tokenizer
    out: list[str] = []
    for start in range(0, len(questions), batch_size):
        if check is not None:
            check()
        prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in questions[start : start + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], device=runtime.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=runtime.device)
        with torch.no_grad():
            generated = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )  # (B, width + new)
        out += [tok.decode(row[width:], skip_special_tokens=True).strip() for row in generated]
    return out


def perplexity(runtime: PLMRuntime, adapter: str | None, windows: list[list[int]], *, batch_size: int = 8,
               check: Check | None = None) -> float:
    import torch
    import torch.nn.functional as F

    model = activate(runtime, adapter)
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        if check is not None:
            check()
        ids = torch.tensor(windows[start : start + batch_size], device=runtime.device)  # (B, L)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1].float()  # (B, L-1, V)
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="sum")
        total, count = total + float(nll), count + ids[:, 1:].numel()
    return math.exp(total / max(count, 1))


def heldout_windows(runtime: PLMRuntime, config: GateConfig) -> list[list[int]]:
    return text_windows(runtime.tokenizer, heldout_text(), count=config.heldout_windows,
                        length=config.heldout_tokens, seed=1234)


def fact_checks(runtime: PLMRuntime, adapter: str | None, facts: list[Fact], *, per_fact: int = 1,
                max_new_tokens: int = 24, check: Check | None = None) -> dict[str, bool]:
    """memory id -> whether every probe of that fact was answered with its value."""
    asked = [(f, q) for f in facts for q in probes(f)[:per_fact]]
    replies = answers(runtime, adapter, [q for _, q in asked], max_new_tokens=max_new_tokens, check=check)
    known = {f.memory_id: True for f in facts}
    for (fact, _), reply in zip(asked, replies, strict=True):
        known[fact.memory_id] &= contains_value(reply, fact.value)
    return known


def evaluate(
    runtime: PLMRuntime, adapter: str | None, facts: list[Fact], corrections: list[Correction],
    config: GateConfig, *, base_ppl: float | None = None, check: Check | None = None,
) -> GateReport:
    """Runs the three checks on one adapter (None: the base model). `check` is called between
    batches; it raises to stop the gate early (the server shutting down mid-update)."""
    report = GateReport(passed=False, facts=len(facts), corrections=len(corrections))
    known = fact_checks(runtime, adapter, facts, per_fact=config.probes_per_fact,
                        max_new_tokens=config.max_new_tokens, check=check)
    report.facts_known = sum(known.values())
    report.facts_missed = [m for m, ok in known.items() if not ok]
    if corrections:
        replies = answers(runtime, adapter, [probes(c.fact)[0] for c in corrections],
                          max_new_tokens=config.max_new_tokens, check=check)
        report.corrections_failed = [
            c.fact.memory_id for c, r in zip(corrections, replies, strict=True)
            if not contains_value(r, c.fact.value) or contains_value(r, c.old_value)
        ]
    windows = heldout_windows(runtime, config)
    report.ppl_base = base_ppl if base_ppl is not None else perplexity(runtime, None, windows, check=check)
    report.ppl_adapted = perplexity(runtime, adapter, windows, check=check)
    if report.fact_recall < config.min_fact_recall:
        report.reasons.append(
            f"knows {report.facts_known} of {report.facts} facts ({report.fact_recall:.0%}); "
            f"needs {config.min_fact_recall:.0%}"
        )
    if report.corrections_failed:
        report.reasons.append(f"{len(report.corrections_failed)} of {report.corrections} corrections not honoured")
    if report.ppl_drift > config.max_ppl_drift:
        report.reasons.append(
            f"held-out perplexity drift {report.ppl_drift:+.2%} exceeds {config.max_ppl_drift:.0%}"
        )
    report.passed = not report.reasons
    return report
