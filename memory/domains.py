"""Domain activation tracking (seed 004, phase 3): which knowledge domains each user touches.

A mixin of `MemoryStore`. Two sources are counted per user and domain: `retrieval` (a memory of
that domain was served into a request) and `memory` (a new memory of that domain was written).
A memory's domains are the ones stored on it, or, when it has none (the rule extractor sets
none), the ones `infer_domains` reads from its sentence with a small keyword lexicon.
The counts are what a personal model's pruning would read: domains under ~1% can go.
"""

from __future__ import annotations

import functools
import re
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import duckdb

__all__ = ["DOMAIN_SOURCES", "DomainActivations", "DomainCount", "infer_domains"]

DOMAIN_SOURCES = ("retrieval", "memory")

# domain -> words (lower case, whole words; a trailing "*" matches any ending)
_LEXICON: dict[str, tuple[str, ...]] = {
    "programming": ("code", "coding", "program*", "developer*", "software", "engineer*", "python",
                    "rust", "java", "javascript", "typescript", "golang", "c++", "kotlin", "react",
                    "api", "git", "neovim", "vim", "emacs", "vs code", "ide", "compiler", "debug*",
                    "backend", "frontend", "tabs", "spaces", "mypy", "pandas", "django", "drupal"),
    "databases": ("sql", "postgres*", "mysql", "sqlite", "database*", "duckdb", "query", "queries"),
    "devops": ("docker", "kubernetes", "linux", "ubuntu", "windows", "macos", "server*", "cloud",
               "aws", "deploy*", "cluster*"),
    "food": ("food", "cook*", "recipe*", "eat", "eats", "vegetarian", "vegan", "meat", "pork", "beef",
             "coffee", "tea", "spicy", "cilantro", "dessert", "bak*", "cuisine", "thai", "korean",
             "italian", "lasagna", "gluten", "lactose", "mushrooms", "breakfast", "dinner", "lunch"),
    "health": ("allergic", "allergy", "allergies", "diabetes", "diabetic", "doctor", "medication*",
               "penicillin", "blood", "asthma", "diet", "sodium", "sleep*", "hospital", "nurse",
               "paramedic", "glasses", "intolerant", "peanuts", "nuts", "shellfish", "cashews"),
    "fitness": ("gym", "run", "running", "marathon", "hiking", "hike*", "bouldering", "climbing",
                "swim*", "yoga", "cycling", "bike", "skiing", "workout*", "training"),
    "travel": ("travel*", "trip*", "flight*", "flying", "visa", "airport", "hotel*", "abroad",
               "vacation", "holiday*"),
    "music": ("music", "band", "jazz", "opera", "guitar*", "cello", "piano", "bass", "song*",
              "concert*", "radiohead"),
    "languages": ("speak*", "fluent", "french", "german", "spanish", "mandarin", "japanese",
                  "portuguese", "italian", "english", "language*", "native"),
    "family": ("wife", "husband", "partner", "kid", "kids", "child", "children", "son", "daughter",
               "mother", "father", "mom", "dad", "sister*", "brother*", "baby", "married", "family"),
    "pets": ("dog", "dogs", "cat", "cats", "pet", "pets", "puppy", "rabbit*", "retriever", "beagle"),
    "work": ("job", "work", "works", "working", "employer", "company", "office", "career",
             "colleague*", "manager", "startup", "freelance", "shifts", "meetings", "retired"),
    "finance": ("money", "salary", "tax", "taxes", "mortgage", "invest*", "stock*", "budget",
                "bank", "pension", "rent", "loan*"),
    "education": ("school", "university", "student", "phd", "degree", "graduated", "studying",
                  "teach*", "law student", "course*", "exam*", "mit"),
    "home": ("live", "lives", "living", "flat", "house", "apartment", "moved", "moving", "relocat*",
             "based in", "countryside", "attic", "neighbo*"),
    "entertainment": ("film*", "movie*", "series", "book*", "reading", "sci-fi", "novel*", "ghibli",
                      "horror", "tv", "games", "gaming", "chess"),
}


def _pattern(word: str) -> str:
    tail = r"[\w-]*" if word.endswith("*") else ""
    return rf"(?<![\w+]){re.escape(word.rstrip('*'))}{tail}(?![\w+])"


_DOMAIN_RES = {domain: re.compile("|".join(_pattern(w) for w in words))
               for domain, words in _LEXICON.items()}
# Each domain's words as plain substrings, without the word-boundary lookarounds: a hit of the
# regex above needs one of them in the text, and finding none costs a fraction of the regex, so
# most domains of a sentence are ruled out without it (32 against 175-187 us a memory here).
_DOMAIN_STEMS = {domain: re.compile("|".join(re.escape(w.rstrip("*")) for w in words))
                 for domain, words in _LEXICON.items()}


def infer_domains(text: str, *, limit: int = 3, cache: bool = True) -> tuple[str, ...]:
    """Up to `limit` domains a sentence is about, most keyword hits first (ties by name).
    `cache=False` for text seen once (a chat query): it would only push memories out."""
    if cache and len(text) <= _CACHED_CHARS:
        return _cached_domains(text, limit)
    return _infer_domains(text, limit)


# ~0.3 ms a sentence, and a 10k-memory user's preload asks 30k times: memories (short) are
# remembered; long texts (whole messages, pasted code) are not, so the cache stays under ~20 MB.
_CACHED_CHARS = 512


@functools.lru_cache(maxsize=32_768)
def _cached_domains(text: str, limit: int) -> tuple[str, ...]:
    return _infer_domains(text, limit)


def _infer_domains(text: str, limit: int) -> tuple[str, ...]:
    lower = text.lower()
    hits = Counter({domain: len(_DOMAIN_RES[domain].findall(lower)) for domain, stems in _DOMAIN_STEMS.items()
                    if stems.search(lower)})
    ranked = sorted((d for d, n in hits.items() if n), key=lambda d: (-hits[d], d))
    return tuple(ranked[:limit])


def domains_of(domains: Sequence[str], content: str) -> tuple[str, ...]:
    """A memory's own domains, else the inferred ones."""
    return tuple(domains) if domains else infer_domains(content)


@dataclass(frozen=True, slots=True)
class DomainCount:
    domain: str
    retrieval: int  # times a memory of this domain was served into a request
    memory: int  # new memories of this domain
    last_at: datetime

    @property
    def total(self) -> int:
        return self.retrieval + self.memory


class DomainActivations:
    """Needs `_write_lock`, `_writable_cursor()`/`_cursor()` and `clock` from the store."""

    _write_lock: threading.RLock

    def _cursor(self) -> duckdb.DuckDBPyConnection: ...  # provided by MemoryStore

    def _writable_cursor(self) -> duckdb.DuckDBPyConnection: ...  # provided by MemoryStore

    def record_domains(self, user_id: str, domains: Iterable[str], source: str) -> None:
        """Count one activation of each domain (a domain repeated counts once per repeat)."""
        counts = Counter(d.strip().lower() for d in domains if d and d.strip())
        self._upsert_domains([(user_id, domain, n) for domain, n in sorted(counts.items())], source)

    def record_retrieved_domains(self, served: Mapping[str, Mapping[str, int]]) -> None:
        """Count the domains of memories served into requests: user id -> memory id -> times."""
        users, ids, times = zip(*((u, i, n) for u, per in served.items() for i, n in per.items()), strict=True)
        rows = self._cursor().execute(
            "SELECT m.user_id, m.domains, m.content, s.n FROM memories AS m JOIN "
            "(SELECT unnest(?::VARCHAR[]) AS user_id, unnest(?::VARCHAR[]) AS id, unnest(?::BIGINT[]) AS n) AS s "
            "ON m.id = s.id AND m.user_id = s.user_id",
            [list(users), list(ids), list(times)],
        ).fetchall()
        counts: Counter[tuple[str, str]] = Counter()
        for user_id, domains, content, n in rows:
            for domain in domains_of(domains, content):
                if domain and domain.strip():
                    counts[(user_id, domain.strip().lower())] += n
        self._upsert_domains([(u, d, n) for (u, d), n in sorted(counts.items())], "retrieval")

    def _upsert_domains(self, rows: list[tuple[str, str, int]], source: str) -> None:
        """Add counts to (user, domain, source) rows in one statement (rows must be distinct)."""
        if source not in DOMAIN_SOURCES:
            raise ValueError(f"source must be one of {DOMAIN_SOURCES}")
        if not rows:
            return
        users, names, counts = zip(*rows, strict=True)
        now = self.clock.now()  # type: ignore[attr-defined]
        with self._write_lock:
            self._writable_cursor().execute(
                "INSERT INTO domain_activations SELECT unnest($1::VARCHAR[]), unnest($2::VARCHAR[]), $3, "
                "unnest($4::BIGINT[]), $5, $5 "
                "ON CONFLICT (user_id, domain, source) DO UPDATE SET "
                "count = domain_activations.count + excluded.count, last_at = excluded.last_at",
                [list(users), list(names), source, list(counts), now],
            )

    def domain_activations(self, user_id: str) -> list[DomainCount]:
        """The user's domains, most activated first."""
        rows = self._cursor().execute(
            """
            SELECT domain,
                   sum(count) FILTER (WHERE source = 'retrieval') AS retrieval,
                   sum(count) FILTER (WHERE source = 'memory') AS memory,
                   max(last_at)
            FROM domain_activations WHERE user_id = ?
            GROUP BY domain
            """,
            [user_id],
        ).fetchall()
        counts = [DomainCount(d, int(r or 0), int(m or 0), last) for d, r, m, last in rows]
        return sorted(counts, key=lambda c: (-c.total, c.domain))
