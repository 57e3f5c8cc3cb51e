"""The synthetic memory tasks ask what they claim to ask, and the corpus is offline and stable."""

from __future__ import annotations

import torch

from adapters.nml import tasks
from adapters.nml.corpus import corpus_info, corpus_split, text_batch


def _answers(batch: tasks.TaskBatch, row: int) -> dict[int, int]:
    """key -> value as stated in the facts at the start of a row."""
    toks = batch.tokens[row].tolist()
    return {toks[i]: toks[i + 1] for i in range(len(toks) - 1) if toks[i] < tasks.N_KEYS and
            tasks.VALUE_BASE <= toks[i + 1] < tasks.VALUE_BASE + tasks.N_VALUES}


def test_mqar_asks_about_pairs_stated_more_than_the_gap_before():
    batch = tasks.mqar(4, 8, 340, 300, gen=torch.Generator().manual_seed(0))
    assert batch.tokens.shape == batch.targets.shape == (4, 340)
    for row in range(4):
        asked = (batch.targets[row] != -100).nonzero().flatten().tolist()
        assert len(asked) == 8 and min(asked) - 15 > 300  # last fact at position 15
        facts = _answers(tasks.TaskBatch(batch.tokens[:, :16], batch.targets[:, :16]), row)
        for pos in asked:
            key = int(batch.tokens[row, pos])
            assert int(batch.targets[row, pos]) == facts[key] == int(batch.tokens[row, pos + 1])
        filler = batch.tokens[row, 16:-16]
        assert ((filler >= tasks.FILLER_BASE) & (filler < tasks.FILLER_BASE + tasks.N_FILLER)).all()


def test_assoc_retrieval_closes_each_span_with_a_pair():
    batch = tasks.assoc_retrieval(2, 5, 16, 300, gen=torch.Generator().manual_seed(0))
    assert batch.tokens.shape[1] % 16 == 0
    keys = batch.tokens[:, 14:80:16]  # second-to-last token of the first five spans
    assert (keys < tasks.N_KEYS).all()
    asked = batch.tokens[batch.targets != -100]
    assert set(asked.tolist()) <= set(keys.flatten().tolist())


def test_recall_accuracy_of_a_model_that_always_answers_right_is_one():
    batch = tasks.mqar(2, 4, 330, 300, gen=torch.Generator().manual_seed(1))

    class Oracle(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, state=None, **_):
            logits = torch.nn.functional.one_hot(batch.targets.clamp(min=0), 256).float()
            start = 0 if state is None else state
            out = type("Out", (), {})()
            out.logits, out.state, out.stats = logits[:, start : start + x.shape[1]], start + x.shape[1], {}
            return out

    acc, _, _ = tasks.recall_accuracy(Oracle(), batch, segment_len=100)
    assert acc == 1.0


def test_corpus_is_the_standard_library_docs_and_reproducible():
    info = corpus_info()
    assert info["bytes"] > 300_000 and info == corpus_info()
    train, val = corpus_split()
    assert len(val) < len(train) / 10 and int(train.max()) < 256
    x, y = text_batch(train, 3, 64, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 64) and torch.equal(x[:, 1:], y[:, :-1])
