"""Synthetic memory tasks over the byte vocabulary, and the recall metric.

Token layout (ids < 256, so the same byte-level model reads text and tasks):

    KEYS    0..63     keys / profile attributes
    VALUES  64..127   values (chance for a recalled value: 1/64)
    FILLER  128..247  distractor tokens between the facts and the questions

Every generator returns ``tokens`` (B, L) and ``targets`` (B, L): targets are -100 except at
the positions whose next token is a recalled value (the query key), where they hold that value.

- ``mqar``: multi-query associative recall. n (key, value) pairs, filler, then queries
  "key value" about those pairs. With ``gap`` > the working-memory window, only a memory that
  persists beyond it (EM, PM) can answer.
- ``assoc_retrieval``: the same question with one pair at the end of each plasticity span, so
  each PM commit can hold one association (PM commits once per boundary).
- ``profile_facts``: a few "attribute value" facts stated once, then a delay of 1K-4K filler
  tokens, then questions about them; run in segments with the state carried.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

N_KEYS, VALUE_BASE, N_VALUES, FILLER_BASE, N_FILLER = 64, 64, 64, 128, 120
CHANCE = 1 / N_VALUES


@dataclass
class TaskBatch:
    tokens: torch.Tensor  # (B, L) long
    targets: torch.Tensor  # (B, L) long, -100 where nothing is asked


def _filler(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(FILLER_BASE, FILLER_BASE + N_FILLER, (batch, length), generator=gen)


def _pairs(batch: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n distinct keys and a random value for each: (B, n) twice."""
    keys = torch.stack([torch.randperm(N_KEYS, generator=gen)[:n] for _ in range(batch)])
    values = torch.randint(VALUE_BASE, VALUE_BASE + N_VALUES, (batch, n), generator=gen)
    return keys, values


def _questions(keys: torch.Tensor, values: torch.Tensor, n_queries: int, gen: torch.Generator):
    """Queries about the pairs, each key at most once: tokens (B, 2q) and targets (B, 2q)."""
    batch, n = keys.shape
    pick = torch.stack([torch.randperm(n, generator=gen)[:n_queries] for _ in range(batch)])  # (B, q)
    qk, qv = torch.gather(keys, 1, pick), torch.gather(values, 1, pick)
    tokens = torch.stack([qk, qv], dim=-1).flatten(1)  # (B, 2q): k v k v ...
    targets = torch.full_like(tokens, -100)
    targets[:, 0::2] = qv  # at the key, predict its value
    return tokens, targets


def mqar(batch: int, n_pairs: int, length: int, gap: int, n_queries: int | None = None,
         gen: torch.Generator | None = None) -> TaskBatch:
    """Pairs at the start, at least ``gap`` filler tokens, queries at the end; ``length`` total."""
    gen = gen or torch.Generator().manual_seed(0)
    n_queries = min(n_queries or n_pairs, n_pairs)
    keys, values = _pairs(batch, n_pairs, gen)
    facts = torch.stack([keys, values], dim=-1).flatten(1)  # (B, 2n)
    q_tokens, q_targets = _questions(keys, values, n_queries, gen)
    fill = length - facts.shape[1] - q_tokens.shape[1]
    if fill < gap:
        raise ValueError(f"length {length} leaves {fill} filler tokens, fewer than gap {gap}")
    tokens = torch.cat([facts, _filler(batch, fill, gen), q_tokens], dim=1)
    targets = torch.cat([torch.full((batch, facts.shape[1] + fill), -100), q_targets], dim=1)
    return TaskBatch(tokens, targets)


def assoc_retrieval(batch: int, n_pairs: int, span: int, gap: int, n_queries: int | None = None,
                    gen: torch.Generator | None = None) -> TaskBatch:
    """One pair ending each of the first n plasticity spans (filler before it), >= ``gap``
    filler tokens, then the queries; total length a multiple of ``span``."""
    gen = gen or torch.Generator().manual_seed(0)
    n_queries = min(n_queries or n_pairs, n_pairs)
    keys, values = _pairs(batch, n_pairs, gen)
    lead = _filler(batch, n_pairs * span, gen).view(batch, n_pairs, span)
    lead[:, :, -2], lead[:, :, -1] = keys, values  # the pair closes its span
    q_tokens, q_targets = _questions(keys, values, n_queries, gen)
    fill = gap + (-(n_pairs * span + gap + q_tokens.shape[1])) % span
    tokens = torch.cat([lead.flatten(1), _filler(batch, fill, gen), q_tokens], dim=1)
    targets = torch.cat([torch.full((batch, n_pairs * span + fill), -100), q_targets], dim=1)
    return TaskBatch(tokens, targets)


def profile_facts(batch: int, n_facts: int, delay: int, gen: torch.Generator | None = None) -> TaskBatch:
    """A user states n profile facts ("attribute value") once; ``delay`` tokens later they are
    asked back. Same token layout as ``mqar``."""
    return mqar(batch, n_facts, 2 * n_facts + delay + 2 * n_facts, delay, n_facts, gen)


@torch.no_grad()
def recall_accuracy(model, task: TaskBatch, *, segment_len: int, state=None, pm: bool = True,
                    em: bool = True) -> tuple[float, dict[str, float], dict]:
    """Accuracy of the argmax prediction at the asked positions, running the sequence in
    segments with the state carried. Returns (accuracy, write stats, final state)."""
    device = next(model.parameters()).device
    tokens, targets = task.tokens.to(device), task.targets.to(device)
    correct = asked = 0
    totals: dict[str, float] = {}
    for start in range(0, tokens.shape[1], segment_len):
        seg = slice(start, start + segment_len)
        out = model(tokens[:, seg], state, pm=pm, em=em)
        state = out.state
        mask = targets[:, seg] != -100
        correct += int((out.logits.argmax(-1)[mask] == targets[:, seg][mask]).sum())
        asked += int(mask.sum())
        for key, value in out.stats.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return correct / max(asked, 1), write_rates(totals), state


def write_rates(totals: dict[str, float]) -> dict[str, float]:
    """PM commits per boundary and EM writes per token, from summed forward stats."""
    rates = {}
    if totals.get("pm_boundaries"):
        rates["pm_commit_rate"] = totals["pm_commits"] / totals["pm_boundaries"]
    if totals.get("em_tokens"):
        rates["em_write_rate"] = totals["em_writes"] / totals["em_tokens"]
    return rates


def task_source(task: str, batch: int, length: int, *, span: int, n_pairs: int = 8, gap: int = 300):
    """A training source ``gen -> (inputs, targets)`` for ``train``: "text" (the offline corpus),
    "mqar" or "assoc". Profile facts are evaluated on a model trained on mqar."""
    if task == "text":
        from adapters.nml.corpus import corpus_split, text_batch

        stream, _ = corpus_split()
        return lambda gen: text_batch(stream, batch, length, gen)
    makers = {
        "mqar": lambda gen: mqar(batch, n_pairs, length, gap, gen=gen),
        "assoc": lambda gen: assoc_retrieval(batch, n_pairs, span, gap, gen=gen),
    }
    if task not in makers:
        raise ValueError(f"unknown task {task!r}: use text, mqar or assoc")

    def source(gen: torch.Generator):
        b = makers[task](gen)
        return b.tokens, b.targets

    return source
