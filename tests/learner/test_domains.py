"""Domain activation tracking: per-user counts from new memories and from retrieval."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from learner.domains import domain_report
from memory import HashEmbedder, MemoryStore, infer_domains
from proxy import create_app
from tests.proxy.conftest import KEYS, PROXY_KEY, TEAM_KEY, make_settings, running


@pytest.fixture
def store(tmp_path):
    with MemoryStore.open(tmp_path / "memlane.duckdb", embedder=HashEmbedder()) as opened:
        yield opened


def counts(store: MemoryStore, user: str) -> dict[str, tuple[int, int]]:
    return {c.domain: (c.retrieval, c.memory) for c in store.domain_activations(user)}


@pytest.mark.parametrize(("text", "domains"), [
    ("The user is allergic to peanuts.", ("health",)),
    ("The user writes Python and prefers Postgres.", ("databases", "programming")),
    ("The user lives in Oslo.", ("home",)),
    ("The user likes the colour blue.", ()),
])
def test_domains_are_inferred_from_a_sentence(text, domains):
    assert infer_domains(text) == domains


def test_chat_queries_do_not_fill_the_domain_cache():
    """The preload lookup guesses the domain of every chat query; queries rarely repeat, so
    caching them would grow the cache for its first 32k requests and push memories out."""
    from datetime import UTC, datetime

    from learner.dream import PreloadCache
    from memory.domains import _cached_domains

    before = _cached_domains.cache_info().currsize
    cache = PreloadCache()
    for i in range(50):
        cache.candidate("ada", f"Is there a peanut-free bakery near me? ({i})", datetime.now(UTC))
    assert infer_domains("Is there a peanut-free bakery near me?", cache=False) == ("food",)
    assert _cached_domains.cache_info().currsize == before
    infer_domains("The user is allergic to peanuts.")  # memories are cached
    assert _cached_domains.cache_info().currsize <= before + 1


def test_new_memories_count_their_domains_stored_or_inferred(store):
    store.add("ada", "The user is allergic to peanuts.")
    store.add("ada", "The user is vegetarian.")
    store.add("ada", "The user maintains a Drupal site.", domains=["drupal"])
    store.add("ada", "The user is allergic to peanuts.")  # corroboration: no new memory
    store.add("bob", "The user loves jazz.")
    assert counts(store, "ada") == {"health": (0, 1), "food": (0, 1), "drupal": (0, 1)}
    assert counts(store, "bob") == {"music": (0, 1)}


def test_retrieval_counts_the_domains_of_the_memories_it_serves(store):
    store.add("ada", "The user is allergic to peanuts.")
    store.add("ada", "The user loves jazz.")
    for _ in range(3):
        store.search_text("ada", "allergic to peanuts", k=1)
    store.search_text("ada", "what music", k=1, touch=False)  # looking, not serving: not counted
    store.flush()
    assert counts(store, "ada") == {"health": (3, 1), "music": (0, 1)}


def test_report_gives_shares_and_the_seeds_pruning_decision(store):
    store.record_domains("ada", ["drupal"] * 90 + ["python"] * 7 + ["cooking"] * 3, "retrieval")
    store.record_domains("ada", ["law"], "memory")
    report = {s.domain: s for s in domain_report(store, "ada")}
    assert [s.domain for s in domain_report(store, "ada")] == ["drupal", "python", "cooking", "law"]
    assert report["drupal"].share == pytest.approx(90 / 101) and report["drupal"].decision == "keep"
    assert report["python"].decision == "keep" and report["cooking"].decision == "undecided"
    assert report["law"].decision == "prune"


def test_wiping_a_user_drops_their_counts(store):
    store.add("ada", "The user is allergic to peanuts.")
    store.wipe_user("ada")
    assert store.domain_activations("ada") == []


async def test_api_lists_the_callers_domains_only(tmp_path, store):
    store.add("alice", "The user is allergic to peanuts.")
    store.add("team", "The user loves jazz.")
    app = create_app(make_settings(tmp_path, keys=KEYS), store=store, embedder=HashEmbedder())
    async with running(app) as client:
        r = await client.get("/v1/domains", headers={"authorization": f"Bearer {PROXY_KEY}"})
        assert r.status_code == 200
        assert [(d["domain"], d["memory"], d["share"]) for d in r.json()["data"]] == [("health", 1, 1.0)]
        r = await client.get("/v1/domains", headers={"authorization": f"Bearer {TEAM_KEY}"})
        assert [d["domain"] for d in r.json()["data"]] == ["music"]
        r = await client.get("/v1/domains")
        assert r.status_code == 401 and r.json()["error"]["code"]


def test_cli_prints_the_domains(tmp_path):
    db = tmp_path / "cli.duckdb"
    with MemoryStore.open(db, embedder=HashEmbedder()) as s:
        s.add("default", "The user is vegetarian.")
    from proxy.cli import app

    result = CliRunner().invoke(app, ["domains", "--json", "--db", str(db)], env={"MEMLANE_EMBEDDER": "hash"})
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert (row["domain"], row["memory"], row["decision"]) == ("food", 1, "keep")


def test_inferring_with_the_substring_prefilter_finds_what_every_domain_regex_finds():
    """`infer_domains` runs a domain's regex only when one of its words occurs as a substring
    (5x faster); on 5,000 sentences mixing lexicon words, their stems inside other words,
    hyphens and punctuation, it agrees with running all of them."""
    from collections import Counter

    from memory.domains import _DOMAIN_RES, _LEXICON, _infer_domains

    def every_regex(text: str) -> tuple[str, ...]:
        lower = text.lower()
        hits = Counter({d: len(p.findall(lower)) for d, p in _DOMAIN_RES.items()})
        return tuple(sorted((d for d, n in hits.items() if n), key=lambda d: (-hits[d], d))[:3])

    rng = random.Random(11)
    words = [w.rstrip("*") for ws in _LEXICON.values() for w in ws]
    filler = ["the", "user", "b", "un", "s", "ing", "-", "+", "x", "likes", "never", "ed"]
    for _ in range(5000):
        parts = [rng.choice(words if rng.random() < 0.4 else filler) for _ in range(rng.randint(1, 12))]
        joiners = [rng.choice([" ", "", "-", ", ", "+", ". "]) for _ in parts]
        text = "".join(p + j for p, j in zip(parts, joiners, strict=True))
        text = text.upper() if rng.random() < 0.1 else text
        assert _infer_domains(text, 3) == every_regex(text), text
