"""Precision and recall of the fact extractors on a labelled set of user utterances.

    python -m tests.benchmarks.bench_extraction                 # every extractor available
    python -m tests.benchmarks.bench_extraction --only local    # the rule-based one only
    python -m tests.benchmarks.bench_extraction --out extraction.json --errors
    python -m tests.benchmarks.bench_extraction --only llm --model-cache DIR --threads 1 --offset 180
                                                    # the LLM on SmolLM2, from the 181st message on

The development set (`tests/learner/data/utterances.jsonl`, 261 messages) was written for this
benchmark before the rule extractor was last tuned on its errors; the held-out set
(`utterances_heldout.jsonl`, 42 messages, `--set heldout`) was written after and never tuned on.
Neither comes from the extractor's tests: each line is one user message with a category and the facts a careful reader
would store about the user from it (none for questions, hypotheticals, requests, small talk,
other people's facts, quoted or code text, memlane's own memory block, system-prompt-like text
and the assistant's words pasted back).

Matching rule. An expected fact carries key words ("allergic penicillin"; "a|b" means either; "_"
stands for a space). A predicted fact matches an expected fact of the same message when every key
occurs in the prediction's text as a whole word, case-insensitively, after "n't" is read as
" not". Each prediction matches at most one expected fact and the other way round (greedy, in
order). Precision = matched predictions / predictions; recall = matched expected facts / expected
facts. Any prediction on a message with no expected fact is a false positive, including one that
restates another person's fact about that person.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tests.benchmarks.progress import track

DATA = Path(__file__).resolve().parents[1] / "learner" / "data"
SET_PATH = DATA / "utterances.jsonl"  # the development set
HELDOUT_PATH = DATA / "utterances_heldout.jsonl"  # written after the extractor's last change

Extractor = Callable[[str], list[str]]  # message -> predicted fact sentences


@dataclass(frozen=True, slots=True)
class Utterance:
    id: int
    text: str
    category: str
    facts: tuple[tuple[str, tuple[str, ...]], ...]  # (content, keys)


@dataclass(slots=True)
class Tally:
    predicted: int = 0
    correct: int = 0  # predictions matching an expected fact
    expected: int = 0
    found: int = 0  # expected facts matched by a prediction
    errors: list[dict] = field(default_factory=list)

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 1.0

    @property
    def recall(self) -> float:
        return self.found / self.expected if self.expected else 1.0

    def add(self, other: Tally) -> None:
        self.predicted += other.predicted
        self.correct += other.correct
        self.expected += other.expected
        self.found += other.found
        self.errors += other.errors


def load_set(path: Path = SET_PATH) -> list[Utterance]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            doc = json.loads(line)
            facts = tuple((f["content"], tuple(f["keys"])) for f in doc["facts"])
            rows.append(Utterance(doc["id"], doc["text"], doc["category"], facts))
    return rows


def _normal(text: str) -> str:
    text = text.lower().replace("’", "'")
    text = re.sub(r"\bcan't\b|\bcannot\b", "can not", text)
    text = re.sub(r"\bwon't\b", "will not", text)
    return re.sub(r"n't\b", " not", text)


def _has_key(text: str, key: str) -> bool:
    return any(
        re.search(rf"(?<!\w){re.escape(alt.replace('_', ' '))}(?!\w)", text)
        for alt in key.split("|")
    )


def matches(prediction: str, keys: Iterable[str]) -> bool:
    text = _normal(prediction)
    return all(_has_key(text, key) for key in keys)


def score_one(utterance: Utterance, predictions: list[str]) -> Tally:
    tally = Tally(predicted=len(predictions), expected=len(utterance.facts))
    open_facts = list(utterance.facts)
    for prediction in predictions:
        hit = next((f for f in open_facts if matches(prediction, f[1])), None)
        if hit is None:
            tally.errors.append({"id": utterance.id, "kind": "false_positive", "predicted": prediction})
            continue
        open_facts.remove(hit)
        tally.correct += 1
        tally.found += 1
    for content, _ in open_facts:
        tally.errors.append({"id": utterance.id, "kind": "missed", "expected": content})
    return tally


def evaluate(extract: Extractor, utterances: list[Utterance], *, verbose: bool = False) -> dict[str, Tally]:
    """Tallies per category, plus "all"; `verbose` prints each message's outcome as it goes."""
    by_category: dict[str, Tally] = {}
    total = Tally()
    for n, utterance in track(enumerate(utterances, 1), f"extracting {len(utterances)} utterances",
                              total=len(utterances)):
        started = time.perf_counter()
        tally = score_one(utterance, extract(utterance.text))
        if verbose:
            print(f"[{n}/{len(utterances)}] #{utterance.id} {utterance.category}: predicted {tally.predicted}, "
                  f"correct {tally.correct}, expected {tally.expected} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
        by_category.setdefault(utterance.category, Tally()).add(tally)
        total.add(tally)
    return {**dict(sorted(by_category.items())), "all": total}


def local_extractor() -> Extractor:
    from learner.extract import extract_facts

    return lambda text: [fact.content for fact in extract_facts(text)]


FAILURES: list[int] = []  # LLM answers still invalid after the extractor's retries


def llm_extractor(model_cache: str | None, max_new_tokens: int) -> Extractor | None:
    """The LLM extractor (`learner.llm_extract`) on the embedded local model (SmolLM2), when
    this checkout has it. An answer still invalid after its retries counts as no facts (the
    queue would dead-letter that job) and is counted apart."""
    if importlib.util.find_spec("learner.llm_extract") is None:
        return None
    from adapters import LocalModel
    from learner.extractor import ExtractionError
    from learner.llm_extract import LLMExtractor, LocalModelCompleter

    model = LocalModel(cache_dir=Path(model_cache) if model_cache else Path.home() / ".cache" / "memlane" / "models")
    extractor = LLMExtractor(LocalModelCompleter(model, max_new_tokens=max_new_tokens))

    def run(text: str) -> list[str]:
        try:
            return [fact.statement for fact in extractor.extract(text)]
        except ExtractionError:
            FAILURES.append(1)
            return []

    return run


def report(name: str, tallies: dict[str, Tally], seconds: float, n: int) -> dict:
    print(f"\n{name}: {n} utterances in {seconds:.1f} s")
    print(f"{'category':<16}{'expected':>9}{'predicted':>10}{'precision':>10}{'recall':>8}")
    for category, t in tallies.items():
        print(f"{category:<16}{t.expected:>9}{t.predicted:>10}{t.precision:>10.3f}{t.recall:>8.3f}")
    return {c: {"expected": t.expected, "predicted": t.predicted, "correct": t.correct,
                "precision": round(t.precision, 4), "recall": round(t.recall, 4)} for c, t in tallies.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["local", "llm"], help="Run one extractor.")
    parser.add_argument("--set", choices=["dev", "heldout"], default="dev", help="Which labelled set.")
    parser.add_argument("--model-cache", default=None, help="Cache folder of the local model.")
    parser.add_argument("--errors", action="store_true", help="Print every miss and false positive.")
    parser.add_argument("--limit", type=int, default=None,
                        help="Every k-th utterance so that about this many are run (the LLM is slow on CPU).")
    parser.add_argument("--offset", type=int, default=0,
                        help="Skip this many utterances (after --limit), to split a slow LLM run across processes.")
    parser.add_argument("--count", type=int, default=None, help="Run at most this many (after --offset).")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="LLM answer budget (greedy decoding).")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for the LLM.")
    parser.add_argument("--out", type=Path, help="Write the figures as JSON here.")
    args = parser.parse_args()
    utterances = load_set(SET_PATH if args.set == "dev" else HELDOUT_PATH)
    if args.limit and args.limit < len(utterances):
        step = len(utterances) / args.limit
        utterances = [utterances[int(i * step)] for i in range(args.limit)]
    utterances = utterances[args.offset:][:args.count]
    extractors: dict[str, Extractor] = {}
    if args.only in (None, "local"):
        extractors["local (rules)"] = local_extractor()
    if args.only in (None, "llm"):
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        llm = llm_extractor(args.model_cache, args.max_new_tokens)
        if llm is None:
            print("LLM extractor: not available in this checkout (no learner.llm_extract.local_extractor)")
        else:
            extractors["llm (local SmolLM2)"] = llm
    figures = {}
    for name, extract in extractors.items():
        started = time.perf_counter()
        tallies = evaluate(extract, utterances, verbose=name.startswith("llm"))
        figures[name] = report(name, tallies, time.perf_counter() - started, len(utterances))
        if name.startswith("llm"):
            print(f"invalid answers after retries: {len(FAILURES)} of {len(utterances)}")
        if args.errors:
            texts = {u.id: u.text for u in utterances}
            for error in tallies["all"].errors:
                print(f"  {error['kind']:<15} #{error['id']:<4} {texts[error['id']]!r} -> "
                      f"{error.get('predicted') or error.get('expected')!r}")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
