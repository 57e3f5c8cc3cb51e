"""Benchmarks of the NML/EM model with tiny CPU configurations.

Not a test: run it from the repository root and read the figures it prints.

    python -m tests.benchmarks.bench_nml --out bench-nml.json
    python -m tests.benchmarks.bench_nml --quick
    python -m tests.benchmarks.bench_nml --only scan,mqar

Benchmarks (each trains its own tiny model from scratch on CPU, one thread):

    scan        parallel scans vs the sequential loop at T=1024 (median of repeats) and their
                relative error against the float64 loop at T=4096 (fast, slow, mixed decay)
    mqar        associative recall beyond the window (pairs > 300 tokens before the query),
                EM on vs off, accuracy vs number of pairs; EM write rate
    profile     one-shot profile facts recalled after 1K-4K tokens (the mqar model, segments of
                256 with the state carried), memory on vs off
    assoc       associative retrieval through PM alone (EM off, hidden size 32), PM on vs off
                at gaps 300, 1000 and 4000; PM commit rate against the rate one commit per pair
                needs
    stability   a small text model: perplexity on held-out text before/after streaming 100K
                adaptation tokens through its memories, memory off and on
    ablations   retrains without decay, without the commit gate, without eligibility traces
    sparsity    write rates of the full models against the recall they keep vs dense writes
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import structlog
import torch

from adapters.nml import tasks
from adapters.nml.corpus import corpus_info, corpus_split
from adapters.nml.model import NMLConfig, NMLModel
from adapters.nml.scan import (
    scan,
    scan_chunked,
    scan_doubling,
    scan_loop,
    scan_reference,
)
from adapters.nml.train import TrainConfig, perplexity, train
from tests.benchmarks import plots
from tests.benchmarks.progress import counting

TINY = {"d_model": 64, "n_blocks": 1, "n_layers": 1, "d_hidden": 32, "n_heads": 2, "window": 256,
        "plasticity_span": 16, "em_items": 256, "em_dim": 32, "em_writes_per_span": 8, "neuromod_hidden": 32}
MQAR_LEN, GAP, SPAN = 368, 300, 16  # 16 pairs + 300 filler + 16 queries fit in 368
MQAR_STEPS, ASSOC_STEPS = 300, 1500
EM_WRITE_COST = 0.5  # 0.05 left EM writing 24-49% of tokens, and facts 2K+ tokens back overwritten
# Batches trained with memories carried from batch to batch after the fresh-memory phase. 0: a
# first full run with 150 such batches ended with every EM candidate written (50% of tokens) and
# the 2-4 pair and profile recall lost, so the published recipe trains on fresh memories only.
STREAM_STEPS = 0
# The text model's write budget (stability). Budgets bound the *training* mean gate probability;
# the sparsity target counts eval-mode gate openings (p > 0.5) over the adaptation stream, whose
# rate swings with the text (1-20% per 10K bytes). At the old 0.05 cost over 5% budgets the PM
# mean commit probability was still 13% at the end of training (the cost hardly bit) and, once a
# PM commit became a real write (pm_min_strength), 6.9% of the adaptation boundaries committed.
# So: PM gets half the 5% target as budget, the cost is 4x stronger, EM keeps room under its 10%
# target. Tried on the same seed: cost 0.5 (PM 2.5-5%, EM 5-7.5%) kept PM at 6.6-6.9% and cost
# 0.1-0.3 perplexity; a 10% EM budget gave PM 1.7% but no better perplexity. Not robust: with
# training seed 1 this budget commits at 6.7% (7.7% at the old one). See docs/benchmarks.md.
TEXT_WRITE_COST, TEXT_PM_BUDGET, TEXT_EM_BUDGET = 0.2, 0.025, 0.075


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_scan(quick: bool, ctx: dict) -> dict:
    repeats = 3 if quick else 9
    speed = []
    for batch, dim in ((1, 64), (4, 64), (8, 128), (8, 256)):
        a, b = torch.rand(batch, 1024, dim), torch.randn(batch, 1024, dim)
        loop = _median_time(lambda: scan_loop(a, b), repeats)  # noqa: B023
        row = {"shape": [batch, 1024, dim], "loop_ms": round(loop * 1e3, 3)}
        for name, fn in (("doubling", scan_doubling), ("chunked", scan_chunked), ("scan", scan)):
            t = _median_time(lambda: fn(a, b), repeats)  # noqa: B023
            row[f"{name}_ms"], row[f"{name}_speedup"] = round(t * 1e3, 3), round(loop / t, 2)
        speed.append(row)
    errors = {}
    gen = torch.Generator().manual_seed(0)
    for label, (low, high) in {"fast": (0.0, 0.3), "slow": (0.9995, 1.0), "mixed": (0.0, 1.0)}.items():
        a = torch.rand(4, 4096, 64, generator=gen) * (high - low) + low
        b, h0 = torch.randn(4, 4096, 64, generator=gen), torch.randn(4, 64, generator=gen)
        ref = scan_reference(a, b, h0)
        errors[label] = float((scan(a, b, h0).double() - ref).abs().max() / ref.abs().max())
    return {"speed_T1024": speed, "rel_error_T4096": errors}


def _counted(source, advance):
    """`source`, advancing a progress bar once per batch drawn (one batch per training step)."""
    def draw(gen: torch.Generator):
        advance()
        return source(gen)

    return draw


def _train_model(overrides: dict, source, steps: int, seed: int, *, seq_len: int, stream_steps: int = 0,
                 write_cost: float = 0.05, pm_budget: float = 0.05,
                 curve: list | None = None) -> tuple[NMLModel, float]:
    """Trains a tiny model: ``steps`` batches with fresh memories per sequence (phases C then D),
    then ``stream_steps`` batches with the memories carried from batch to batch (a user's
    stream: stale bindings must fade, which is what decay is for)."""
    torch.manual_seed(seed)
    model = NMLModel(NMLConfig(**{**TINY, **overrides}))
    common = {"segment_len": seq_len, "lr": 3e-3, "warmup": 20, "write_cost": write_cost, "seed": seed,
              "pm_commit_budget": pm_budget}
    started = time.perf_counter()
    history = []  # the learning curve: loss every ~1/30 of the steps
    with counting(f"  training ({steps + stream_steps} steps)", steps + stream_steps) as advance:
        history += train(model, _counted(source, advance), TrainConfig(
            steps=steps, phases="C:0.3,D:0.7", carry_state=False, log_every=max(steps // 30, 1), **common))
        if stream_steps:
            history += [{**h, "step": h["step"] + steps} for h in train(model, _counted(source, advance), TrainConfig(
                steps=stream_steps, phases="E:1", carry_state=True, log_every=max(stream_steps // 30, 1), **common))]
    if curve is not None:
        curve += history
    return model, time.perf_counter() - started


def _mqar_source(batch: int):
    choices = (2, 4, 8, 16)

    def source(gen: torch.Generator):
        n = choices[int(torch.randint(0, len(choices), (1,), generator=gen))]
        b = tasks.mqar(batch, n, MQAR_LEN, GAP, gen=gen)
        return b.tokens, b.targets

    return source


def _recall(model, batch: tasks.TaskBatch, **flags) -> tuple[float, dict]:
    acc, rates, _ = tasks.recall_accuracy(model, batch, segment_len=256, **flags)
    return round(acc, 4), {k: round(v, 4) for k, v in rates.items()}


def _mqar_eval(model, n_eval: int, flags: dict | None = None) -> dict:
    out = {}
    for n in (2, 4, 8, 16, 32):
        batch = tasks.mqar(n_eval, n, max(MQAR_LEN, 4 * n + GAP), GAP, gen=torch.Generator().manual_seed(100 + n))
        on, rates = _recall(model, batch, **(flags or {}))
        off, _ = _recall(model, batch, em=False, pm=False)
        out[n] = {"em_on": on, "em_off": off, **rates}
    return out


def _stream_eval(model, n_eval: int, sequences: int, flags: dict | None = None) -> float:
    """MQAR with 8 pairs over consecutive sequences whose memories are carried: keys come back
    bound to new values, so stale items must lose to fresh ones. Mean accuracy."""
    state, accs = None, []
    for i in range(sequences):
        batch = tasks.mqar(n_eval, 8, MQAR_LEN, GAP, gen=torch.Generator().manual_seed(500 + i))
        acc, _, state = tasks.recall_accuracy(model, batch, segment_len=256, state=state, **(flags or {}))
        accs.append(acc)
    return round(statistics.mean(accs), 4)


def bench_mqar(quick: bool, ctx: dict) -> dict:
    steps, stream_steps, n_eval = (60, 0, 32) if quick else (MQAR_STEPS, STREAM_STEPS, 128)
    curve: list = []
    model, seconds = _train_model({"pm_enabled": False}, _mqar_source(16), steps, 0, seq_len=MQAR_LEN,
                                  stream_steps=stream_steps, write_cost=EM_WRITE_COST, curve=curve)
    ctx["mqar_model"] = model
    by_pairs = _mqar_eval(model, n_eval)
    stream = _stream_eval(model, n_eval // 2, 8)
    return {"train_steps": steps + stream_steps, "train_seconds": round(seconds, 1), "chance": tasks.CHANCE,
            "by_pairs": by_pairs, "stream_8_sequences": stream, "params": model.num_parameters(),
            "learning_curve": curve}


def bench_profile(quick: bool, ctx: dict) -> dict:
    model = ctx.get("mqar_model")
    if model is None:
        bench_mqar(quick, ctx)
        model = ctx["mqar_model"]
    n_eval = 32 if quick else 64
    out = {}
    for delay in (1024, 2048, 4096):
        batch = tasks.profile_facts(n_eval, 4, delay, gen=torch.Generator().manual_seed(delay))
        on, rates = _recall(model, batch)
        off, _ = _recall(model, batch, em=False, pm=False)
        out[delay] = {"memory_on": on, "memory_off": off, **rates}
    return {"facts": 4, "by_delay": out, "chance": tasks.CHANCE}


ASSOC_PAIRS = 6
ASSOC_PM = {"em_enabled": False, "window": 16}  # PM alone; a 16-token WM cannot reach the pairs
ASSOC_TRAIN_GAPS = (32, 160)  # training gap drawn per batch: filler commits must learn to wait
# 6 commits are needed whatever the gap: at least 23% of the boundaries at gap 300, 8.6% at
# 1000; only at 4000 (2.3%) can the <= 5% target be met, so that gap is the sparsity figure.
ASSOC_EVAL_GAPS = (300, 1000, 4000)
ASSOC_PM_BUDGET = 0.3  # commit probability allowed for free (6 of the ~10-16 training boundaries close a pair)


def _assoc_source(batch: int, n_pairs: int):
    def source(gen: torch.Generator):
        gap = int(torch.randint(ASSOC_TRAIN_GAPS[0], ASSOC_TRAIN_GAPS[1] + 1, (1,), generator=gen))
        b = tasks.assoc_retrieval(batch, n_pairs, SPAN, gap, gen=gen)
        return b.tokens, b.targets

    return source


def _assoc_eval(model, n_eval: int, sequences: int = 4) -> dict:
    """PM on / off with fresh memories at each evaluation gap, and PM on over consecutive
    sequences with the state carried (every new sequence must rebind the slots)."""
    out = {}
    for gap in ASSOC_EVAL_GAPS:
        batch = tasks.assoc_retrieval(n_eval, ASSOC_PAIRS, SPAN, gap, gen=torch.Generator().manual_seed(gap))
        on, rates = _recall(model, batch, em=False)
        off, _ = _recall(model, batch, em=False, pm=False)
        needed = ASSOC_PAIRS / (batch.tokens.shape[1] // SPAN)  # one commit per pair, none on filler
        out[f"gap_{gap}"] = {"pm_on": on, "pm_off": off, **rates, "pm_commit_rate_needed": round(needed, 4)}
    state, accs = None, []
    for i in range(sequences):
        seq = tasks.assoc_retrieval(n_eval // 2, ASSOC_PAIRS, SPAN, ASSOC_EVAL_GAPS[0],
                                    gen=torch.Generator().manual_seed(900 + i))
        acc, _, state = tasks.recall_accuracy(model, seq, segment_len=256, state=state, em=False)
        accs.append(acc)
    out["stream_pm_on"] = round(statistics.mean(accs), 4)
    return out


def _assoc_len() -> int:
    return tasks.assoc_retrieval(1, ASSOC_PAIRS, SPAN, ASSOC_TRAIN_GAPS[1]).tokens.shape[1]


def _train_assoc(overrides: dict, quick: bool, curve: list | None = None) -> tuple[NMLModel, float]:
    steps, stream_steps = (100, 0) if quick else (ASSOC_STEPS, STREAM_STEPS)
    return _train_model({**ASSOC_PM, **overrides}, _assoc_source(16, ASSOC_PAIRS), steps, 0, seq_len=_assoc_len(),
                        stream_steps=stream_steps, pm_budget=ASSOC_PM_BUDGET, curve=curve)


def bench_assoc(quick: bool, ctx: dict) -> dict:
    curve: list = []
    model, seconds = _train_assoc({}, quick, curve)
    ctx["assoc_model"] = model
    n_eval = 32 if quick else 128
    return {"pairs": ASSOC_PAIRS, "d_hidden": TINY["d_hidden"], "pm_slots": 8, "window": ASSOC_PM["window"],
            "train_gaps": ASSOC_TRAIN_GAPS, "train_seconds": round(seconds, 1), **_assoc_eval(model, n_eval),
            "chance": tasks.CHANCE, "learning_curve": curve}


def bench_stability(quick: bool, ctx: dict) -> dict:
    steps, adapt_tokens, eval_tokens = (100, 20_000, 4096) if quick else (600, 100_000, 16_384)
    train_stream, val = corpus_split()
    torch.manual_seed(0)
    model = NMLModel(NMLConfig(**TINY))

    def source(gen: torch.Generator):
        from adapters.nml.corpus import text_batch

        return text_batch(train_stream, 16, 256, gen)

    cfg = TrainConfig(steps=steps, segment_len=256, lr=3e-3, warmup=20, phases="A:0.2,B:0.15,C:0.15,D:0.25,E:0.25",
                      log_every=max(steps // 30, 1), write_cost=TEXT_WRITE_COST,
                      pm_commit_budget=TEXT_PM_BUDGET, em_write_budget=TEXT_EM_BUDGET)
    started = time.perf_counter()
    with counting(f"  training ({steps} steps)", steps) as advance:
        curve = train(model, _counted(source, advance), cfg)
    seconds = time.perf_counter() - started
    before_off = perplexity(model, val, tokens=eval_tokens, pm=False, em=False)
    before_on = perplexity(model, val, tokens=eval_tokens)
    with torch.no_grad():  # adaptation: stream unrelated training text through the memories
        state, adapt = None, train_stream[-adapt_tokens:].unsqueeze(0)
        totals: dict[str, float] = {}
        for start in range(0, adapt_tokens, 256):
            out = model(adapt[:, start : start + 256], state)
            state = out.state
            for k, v in out.stats.items():
                totals[k] = totals.get(k, 0.0) + float(v)
    fresh = model.init_state(1)  # the adapted memories with fresh recurrent states and WM cache
    adapted = {k: (v if "pm_" in k or "em_" in k else fresh[k]) for k, v in state.items()}
    after_off = perplexity(model, val, tokens=eval_tokens, state=adapted, pm=False, em=False)
    after_on = perplexity(model, val, tokens=eval_tokens, state=adapted)
    return {"corpus": corpus_info(), "train_steps": steps, "train_seconds": round(seconds, 1),
            "adapt_tokens": adapt_tokens, "eval_tokens": eval_tokens,
            "ppl_memory_off": {"before": before_off, "after": after_off, "abs_change": abs(after_off - before_off)},
            "ppl_memory_on": {"before": before_on, "after": after_on, "rel_change": after_on / before_on - 1},
            "adaptation_write_rates": tasks.write_rates(totals), "learning_curve": curve}


def bench_ablations(quick: bool, ctx: dict) -> dict:
    """Each switch off in turn, trained with the same recipe as the full models."""
    steps, stream_steps, n_eval = (60, 0, 32) if quick else (MQAR_STEPS, STREAM_STEPS, 128)
    out = {}
    for name, flag in (("no_decay", "use_decay"), ("no_commit_gate", "use_commit_gate"),
                       ("no_eligibility", "use_eligibility")):
        row = {}
        if flag != "use_eligibility":  # eligibility traces belong to PM only
            em_model, _ = _train_model({"pm_enabled": False, flag: False}, _mqar_source(16), steps, 0,
                                       seq_len=MQAR_LEN, stream_steps=stream_steps, write_cost=EM_WRITE_COST)
            row["mqar_8_pairs"] = _mqar_eval(em_model, n_eval)[8]
            row["mqar_stream_8_sequences"] = _stream_eval(em_model, n_eval // 2, 8)
            row["profile_by_delay"] = bench_profile(quick, {"mqar_model": em_model})["by_delay"]
            if flag == "use_commit_gate":
                ctx["mqar_dense"] = row["mqar_8_pairs"]
        pm_model, _ = _train_assoc({flag: False}, quick)
        row["assoc"] = _assoc_eval(pm_model, n_eval)
        if flag == "use_commit_gate":
            ctx["assoc_dense"] = row["assoc"]
        out[name] = row
        print(f"-- ablation {name}: {json.dumps(row)}", flush=True)
    return out


def bench_sparsity(quick: bool, ctx: dict) -> dict:
    """Write rates of the gated models and the recall they keep against the same models
    trained without the commit gate (dense writes)."""
    if "mqar_model" not in ctx:
        bench_mqar(quick, ctx)
    if "assoc_model" not in ctx:
        bench_assoc(quick, ctx)
    if "mqar_dense" not in ctx:
        bench_ablations(quick, ctx)
    n_eval = 32 if quick else 128
    sparse_mqar = _mqar_eval(ctx["mqar_model"], n_eval)[8]
    gap = f"gap_{ASSOC_EVAL_GAPS[-1]}"
    sparse_assoc = _assoc_eval(ctx["assoc_model"], n_eval)[gap]
    dense_mqar, dense_assoc = ctx["mqar_dense"], ctx["assoc_dense"][gap]
    return {
        "em_mqar_8_pairs": {
            "write_rate": sparse_mqar.get("em_write_rate"), "accuracy": sparse_mqar["em_on"],
            "dense_write_rate": dense_mqar.get("em_write_rate"), "dense_accuracy": dense_mqar["em_on"],
            "kept": round(sparse_mqar["em_on"] / max(dense_mqar["em_on"], 1e-9), 4)},
        f"pm_assoc_{gap}": {
            "commit_rate": sparse_assoc.get("pm_commit_rate"), "accuracy": sparse_assoc["pm_on"],
            "dense_commit_rate": dense_assoc.get("pm_commit_rate"), "dense_accuracy": dense_assoc["pm_on"],
            "kept": round(sparse_assoc["pm_on"] / max(dense_assoc["pm_on"], 1e-9), 4)},
    }


BENCHES = {"scan": bench_scan, "mqar": bench_mqar, "profile": bench_profile, "assoc": bench_assoc,
           "stability": bench_stability, "ablations": bench_ablations, "sparsity": bench_sparsity}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_nml", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few training steps and small evaluations (a smoke run)")
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated benchmarks to run")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--plot", type=Path, default=None, metavar="DIR",
                   help="also draw the learning curves as DIR/bench-nml-learning-curves.png")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings and up
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(BENCHES)
    if unknown:
        raise SystemExit(f"unknown benchmarks: {', '.join(sorted(unknown))}")
    ctx: dict = {}
    results: dict = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                                 "processor": platform.processor() or platform.machine(), "threads": args.threads},
                     "quick": args.quick}
    for name in names:
        started = time.perf_counter()
        results[name] = BENCHES[name](args.quick, ctx)
        results[name]["seconds"] = round(time.perf_counter() - started, 1)
        shown = {k: v for k, v in results[name].items() if k != "learning_curve"}  # --out and --plot have it
        print(f"== {name} ({results[name]['seconds']} s)\n{json.dumps(shown, indent=1)}", flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
    if args.plot:
        print(f"figure written to {plots.learning_curves(results, args.plot)}")


if __name__ == "__main__":
    main()
