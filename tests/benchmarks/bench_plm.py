"""Benchmark: does the personal adapter learn the user's facts without forgetting the world?

    nice -n 10 python -m tests.benchmarks.bench_plm --model-cache ~/.cache/memlane/models

1. A real memlane server (`memlane serve`, loopback, personal model on) is told FACTS first-
   person facts through the openai SDK; its learner extracts and stores them as memories.
2. Recall before: each fact is asked through the server as `plm/<base>` with two phrasings
   written here (BENCH), which are neither the dataset's training questions nor gate (PROBE)
   phrasings.
   Memory injection is off on this server, so answers come from the weights alone.
3. One update (`adapters.plm.run_update`, trained on the learner's dataset, `learner.datasets`;
   the server stopped: DuckDB has one writer), then recall after, asked the same way through a
   fresh server that loads the encrypted adapter.
4. SECOND more facts are taught, a second (incremental) update runs, and the first facts are
   asked again: how many are kept.
Figures: recall before/after, held-out perplexity drift (the gate's, on reference text never
trained on), kept recall after the second update, update wall time, adapter size.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.benchmarks.progress import track

# (statement the user makes, the fact's value, kind of question)
FACTS: list[tuple[str, str, str]] = [
    ("My cat is named Biscuit.", "Biscuit", "name:cat"),
    ("I live in Tromso.", "Tromso", "residence"),
    ("My favourite colour is teal.", "teal", "attr:favourite colour"),
    ("I work as a glassblower.", "glassblower", "occupation"),
    ("I am allergic to kiwi.", "kiwi", "allergy"),
    ("My dog is called Pepperoni.", "Pepperoni", "name:dog"),
    ("I drive a green Volvo.", "green Volvo", "vehicle"),
    ("I was born in Lisbon.", "Lisbon", "birthplace"),
    ("I play the cello.", "cello", "plays"),
    ("My favourite fruit is quince.", "quince", "attr:favourite fruit"),
    ("I speak Icelandic.", "Icelandic", "speaks"),
    ("My favourite number is 37.", "37", "attr:favourite number"),
    ("My favourite drink is kombucha.", "kombucha", "attr:favourite drink"),
    ("I work at Nordlys Labs.", "Nordlys Labs", "employer"),
    ("My parrot is named Mango.", "Mango", "name:parrot"),
    ("My goldfish is named Bubbles.", "Bubbles", "name:goldfish"),
    ("My favourite sport is curling.", "curling", "attr:favourite sport"),
    ("My hamster is named Nugget.", "Nugget", "name:hamster"),
    ("My favourite flower is the tulip.", "tulip", "attr:favourite flower"),
    ("My favourite city is Kyoto.", "Kyoto", "attr:favourite city"),
    # taught before the second update
    ("My horse is named Thunderbolt.", "Thunderbolt", "name:horse"),
    ("My favourite author is Borges.", "Borges", "attr:favourite author"),
    ("My boat is named Seraphine.", "Seraphine", "name:boat"),
    ("My favourite season is autumn.", "autumn", "attr:favourite season"),
    ("My tortoise is named Gustavo.", "Gustavo", "name:tortoise"),
]
# Benchmark phrasings: used nowhere else (checked against the gate's PROBE phrasings at start and
# against every question of the learner's dataset before each update).
BENCH: dict[str, tuple[str, ...]] = {
    "name": ("Quick question: my {t} goes by what name?", "Hey, what do I call my {t}?"),
    "attr": ("Quick question: which {t} did I say I have?", "Hey, what would you say is my {t}?"),
    "residence": ("Quick question: which city is my home?", "Hey, where do I live these days?"),
    "occupation": ("Quick question: what is my trade?", "Hey, what do I work as?"),
    "employer": ("Quick question: which company employs me?", "Hey, what company do I work at?"),
    "allergy": ("Quick question: what triggers my allergy?", "Hey, which fruit am I allergic to?"),
    "vehicle": ("Quick question: which car is it that I drive?", "Hey, what kind of car do I drive?"),
    "birthplace": ("Quick question: which city was I born in?", "Hey, where is it that I was born?"),
    "plays": ("Quick question: which instrument do I play?", "Hey, what instrument do I play?"),
    "speaks": ("Quick question: what language do I know?", "Hey, which language do I speak?"),
}

# A second held-out set, written after the training questions gained "what did I tell you ..."
# forms in answer to misses on BENCH's "which {t} did I say I have?": checked the same way, and
# never used to choose anything, so it is the unbiased figure.
FRESH: dict[str, tuple[str, ...]] = {
    "name": ("Any idea what my {t} is called?", "Sorry, my {t} answers to which name?"),
    "attr": ("Any idea what my {t} is?", "Sorry, my {t} is what again?"),
    "residence": ("Any idea which city I live in?", "Sorry, which town do I call home?"),
    "occupation": ("Any idea what my job is?", "Sorry, what is it I do for work?"),
    "employer": ("Any idea who I work for?", "Sorry, which firm do I work for?"),
    "allergy": ("Any idea what I'm allergic to?", "Sorry, what must I avoid eating because of my allergy?"),
    "vehicle": ("Any idea what car I own?", "Sorry, what's the car I drive?"),
    "birthplace": ("Any idea where I was born?", "Sorry, in which city was I born?"),
    "plays": ("Any idea which instrument I play?", "Sorry, what musical instrument do I play?"),
    "speaks": ("Any idea which language I speak?", "Sorry, what language can I speak?"),
}
HELD_OUT = {"bench": BENCH, "fresh": FRESH}


@dataclass
class Server:
    url: str
    process: subprocess.Popen

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(120)


def questions(kind: str, phrasings: dict[str, tuple[str, ...]] = BENCH) -> list[str]:
    family, _, topic = kind.partition(":")
    return [q.format(t=topic) for q in phrasings[family]]


def check_phrasings() -> None:
    from adapters.plm.facts import PROBE
    from learner.datasets import bare_question

    for family, phrasings in BENCH.items():
        assert not set(phrasings) & set(PROBE[family]), family
        fresh = {bare_question(q) for q in FRESH[family]}
        assert not fresh & {bare_question(q) for q in (*phrasings, *PROBE[family])}, family


def check_unseen(store, facts: list[tuple[str, str, str]]) -> None:
    """No benchmark question is among the questions the learner's dataset could train on, even
    with its opener ("Quick question:", "Hey,") taken off."""
    from learner.datasets import bare_question, build_dataset

    trained = {bare_question(e.instruction) for e in build_dataset(store, "default", paraphrases=1000).examples}
    asked = {bare_question(q) for _, _, kind in facts for held in HELD_OUT.values() for q in questions(kind, held)}
    assert not asked & trained, sorted(asked & trained)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(work: Path, env: dict[str, str]) -> Server:
    port = free_port()
    log = open(work / "server.log", "ab")  # noqa: SIM115 - the child process writes it until it stops
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), "--db", str(work / "memlane.duckdb")],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2],
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"memlane exited with {process.returncode}; see {work / 'server.log'}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return Server(url, process)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("memlane did not become ready")


def teach(client, model: str, facts: list[tuple[str, str, str]]) -> None:
    for statement, _, _ in track(facts, f"teaching {len(facts)} facts"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": statement}], max_tokens=4)


def wait_memories(server: Server, count: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        seen = len(httpx.get(f"{server.url}/v1/memories", params={"limit": 200}, timeout=30).json()["data"])
        if seen >= count:
            break
        time.sleep(0.5)
    return seen


def recall(client, model: str, facts: list[tuple[str, str, str]], *, tokens: int) -> tuple[dict[str, float], list[dict]]:
    """Share of right answers per held-out set ("bench", "fresh"), and every answer."""
    from adapters.plm.facts import contains_value

    rows = []
    for _, value, kind in track(facts, f"asking {len(facts)} facts"):
        for held, phrasings in HELD_OUT.items():
            for q in questions(kind, phrasings):
                answer = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": q}], max_tokens=tokens, temperature=0,
                ).choices[0].message.content or ""
                rows.append({"set": held, "value": value, "question": q, "answer": answer,
                             "right": contains_value(answer, value)})
    rates = {}
    for held in HELD_OUT:
        mine = [r["right"] for r in rows if r["set"] == held]
        rates[held] = sum(mine) / max(len(mine), 1)
    return rates, rows


def update(work: Path, args: argparse.Namespace, runtime) -> dict:
    from adapters.plm import (
        AdapterRegistry,
        GateConfig,
        TrainConfig,
        UpdateConfig,
        run_update,
    )
    from memory import HashEmbedder, MemoryStore

    config = UpdateConfig(
        train=TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, kl_weight=args.kl_weight,
                          seed=args.seed),
        gate=GateConfig(), paraphrases=args.paraphrases, rehearsal=args.rehearsal,
    )
    with MemoryStore.open(work / "memlane.duckdb", embedder=HashEmbedder()) as store:
        check_unseen(store, FACTS)
        result = run_update(store, "default", runtime=runtime, registry=AdapterRegistry(work / "adapters"),
                            config=config)
    v = result.version
    assert v is not None
    return {"version": v.version, "status": v.status, "reasons": v.reasons, "seconds": round(result.seconds, 1),
            "train_seconds": v.training.get("seconds"), "steps": v.training.get("steps"),
            "examples": v.training.get("examples"), "dataset": v.training.get("dataset"), "adapter_bytes": v.bytes,
            "gate": v.report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-cache", type=Path, default=Path.home() / ".cache" / "memlane" / "models")
    parser.add_argument("--facts", type=int, default=20)
    parser.add_argument("--second", type=int, default=5, help="facts taught before the second update")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--kl-weight", type=float, default=3.0)
    parser.add_argument("--paraphrases", type=int, default=6)
    parser.add_argument("--rehearsal", type=int, default=6, help="dataset questions per known memory in update 2")
    parser.add_argument("--tokens", type=int, default=16, help="max tokens per answer")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="training seed (example order, LoRA init, dropout)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    check_phrasings()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from openai import OpenAI

    from adapters.plm import BaseSpec, PLMRuntime

    torch.set_num_threads(args.threads)
    first, second = FACTS[: args.facts], FACTS[args.facts : args.facts + args.second]
    work = Path(tempfile.mkdtemp(prefix="memlane-bench-plm-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMLANE_", "OPENAI_", "ANTHROPIC_", "OLLAMA_"))}
    env.update(HF_HUB_OFFLINE="1", MEMLANE_PLM="true", MEMLANE_PLM_DIR=str(work / "adapters"),
               MEMLANE_MODEL_CACHE=str(args.model_cache), MEMLANE_MEMORY="false", MEMLANE_EMBEDDER="hash",
               MEMLANE_PRELOAD_LOCAL_MODEL="false", MEMLANE_TORCH_THREADS=str(args.threads),
               MEMLANE_PLM_AUTO_UPDATE="false")  # the benchmark runs and times each update itself
    out: dict = {"facts": len(first), "second_facts": len(second), "config": vars(args) | {"out": str(args.out),
                 "model_cache": str(args.model_cache)}}
    runtime = PLMRuntime.load(BaseSpec(cache_dir=args.model_cache))
    model = f"plm/{runtime.name}"

    server = start(work, env)
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=600)
    teach(client, f"local/{runtime.name}", first)
    out["memories_stored"] = wait_memories(server, len(first))
    out["recall_before"], rows_before = recall(client, model, first, tokens=args.tokens)
    server.stop()
    print(f"taught {len(first)} facts, {out['memories_stored']} memories; recall before {out['recall_before']}", flush=True)

    out["update_1"] = update(work, args, runtime)
    print(f"update 1: {out['update_1']['status']} in {out['update_1']['seconds']} s", flush=True)

    server = start(work, env)
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=600)
    out["recall_after"], rows_after = recall(client, model, first, tokens=args.tokens)
    print(f"recall after {out['recall_after']}", flush=True)
    if second:
        teach(client, f"local/{runtime.name}", second)
        wait_memories(server, len(first) + len(second))
    server.stop()

    if second:
        out["update_2"] = update(work, args, runtime)
        print(f"update 2: {out['update_2']['status']} in {out['update_2']['seconds']} s", flush=True)
        server = start(work, env)
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=600)
        out["recall_kept_after_second"], rows_kept = recall(client, model, first, tokens=args.tokens)
        out["recall_new_after_second"], rows_new = recall(client, model, second, tokens=args.tokens)
        server.stop()
    gate = out["update_1"]["gate"]
    out["ppl_base"], out["ppl_adapted"], out["ppl_drift"] = gate["ppl_base"], gate["ppl_adapted"], gate["ppl_drift"]
    out["answers"] = {"before": rows_before, "after": rows_after}
    if second:
        out["answers"] |= {"kept": rows_kept, "new": rows_new}
    summary = {k: v for k, v in out.items() if k not in ("answers",)}
    print(json.dumps(summary, indent=1, default=str))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
