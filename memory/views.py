"""RAM views of users' memories: what one retrieval reads, without a query per step.

A retrieval reads its candidates' rows (`get_many`), the links of its best seeds
(`links_from`) and the memories learned in the same conversations (`conversation_neighbours`):
three DuckDB round trips of 1-3 ms each at 10k memories, on every chat request. For a user
with at most the store's `view_rows` memories (`VIEW_CACHE_MAX_ROWS` by default, shared by
all views) the store keeps those three tables in RAM instead, as one immutable `UserView` per
user, and answers the same calls from dicts.

A view also holds the user's rows of the text index's postings table (`ViewPostings`), scored
with the same BM25 as the SQL (`memory.indexes.BM25_SQL`), since BM25 through DuckDB is the
slowest step of a retrieval (5-10 ms at 10k memories, ~12 ms at 100k, against 5-7 ms for the
whole query embedding). A large user (more than `ANN_MIN_ROWS` vectors, history included)
also gets `ViewVectors`, an HNSW graph of their vectors in RAM (usearch, the library vss
wraps, with vss's parameters; f16 vectors) instead of vss's shared index, over-fetched and
filtered by user (9-20 ms at 100k). Smaller users' vectors are scanned exactly from a RAM copy
(`memory.indexes`).

Freshness: a view is built in the background (the request that finds none is answered by
DuckDB, as before) and dropped by every write to the user's memories, links or sources. A
build that overlaps a write is discarded (`ViewCache.install` compares generations), so a view
never shows less than the database did when it was installed. A large user's dropped view is
kept aside for their next build, which reads again only the rows whose hash changed and patches
the HNSW graph (`ViewVectors.refreshed`: new and re-embedded vectors added, deleted ones
removed) instead of building it again: the graph is most of a large user's build (~35 s per
100k vectors on one core), reading and converting the rows most of the rest (~3 s). Access
statistics, written in batches (`memory.access`), are patched into the view rather than
dropping it. The postings
follow the text index, which is rebuilt on its own schedule: they carry the index's generation,
and a search that finds them older reads BM25 from DuckDB while the store reloads them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

import duckdb
import numpy as np
from usearch.index import Index

from memory.entry import MemoryEntry
from memory.rows import EMBEDDING_DIM, ENTRY_COLUMNS, Link, arrow_table, entry_from_row

__all__ = [
    "ANN_MIN_ROWS",
    "VIEW_CACHE_MAX_ROWS",
    "VIEW_SETTLE_S",
    "BuildCancelled",
    "UserView",
    "ViewCache",
    "ViewPostings",
    "ViewVectors",
    "load_postings",
    "load_view",
]

# Memories held in all views together (about 3 KB each with the search legs); a user with
# more (history included) gets no view. The store's `view_rows` (MEMLANE_MEMORY_VIEW_ROWS).
VIEW_CACHE_MAX_ROWS = 196_608
VIEW_SETTLE_S = 2.0  # no build until the user's memories have been left alone this long
ANN_MIN_ROWS = 16_384  # above this many vectors a view holds the user's HNSW graph
# vss's HNSW defaults (M, ef_construction, ef_search), so the RAM graph finds what vss's did
HNSW_CONNECTIVITY, HNSW_EXPANSION_ADD, HNSW_EXPANSION_SEARCH = 16, 128, 64
BM25_K1, BM25_B = 1.2, 0.75
BUILD_CHUNK = 4096  # vectors added to a graph between checks for cancellation (~1.5 s)
REFRESH_MAX_SHARE = 0.25  # a graph with more of its vectors changed is built again, not patched


class BuildCancelled(Exception):
    """A view's build stopped because the store is closing."""


@dataclass(frozen=True, slots=True)
class ViewVectors:
    """A large user's vectors (history included) as an HNSW graph in RAM: key k is `ids[k]`
    while `keys[ids[k]] == k` (a key whose memory was deleted or re-embedded is removed from
    the graph and from `keys`; `ids` keeps its slot). `hashes` holds DuckDB's hash of each
    vector in the graph, which is how `refreshed` finds the ones that changed. Successive views
    of a user may share one graph (`refreshed`), so every use of it holds `lock`."""

    ids: list[str]
    keys: dict[str, int]
    hashes: dict[str, int]
    index: Index
    lock: threading.Lock

    @classmethod
    def build(cls, ids: list[str], matrix: np.ndarray, hashes: Sequence[int] | None = None, *,
              cancelled: Callable[[], bool] = lambda: False) -> ViewVectors:
        """The graph of `matrix`'s rows, added on one thread (requests run beside it) in chunks,
        between which `cancelled()` may stop the build (the store is closing). Without
        `hashes` every vector counts as changed at the next `refreshed`."""
        index = Index(ndim=EMBEDDING_DIM, metric="cos", dtype="f16", connectivity=HNSW_CONNECTIVITY,
                      expansion_add=HNSW_EXPANSION_ADD, expansion_search=HNSW_EXPANSION_SEARCH)
        vectors = cls([], {}, {}, index, threading.Lock())
        return vectors._with_added(ids, matrix, hashes, cancelled)

    def refreshed(self, hashes: dict[str, int], fetch: Callable[[list[str]], tuple[list[str], np.ndarray, list[int]]],
                  *, cancelled: Callable[[], bool] = lambda: False) -> ViewVectors | None:
        """The graph of the user's vectors now, given their ids and hashes (`hashes`), made from
        this one by removing the vectors that left or changed and adding, through `fetch(ids)`
        (-> ids, vectors, hashes), the new and changed ones; None when that is more work than
        a new graph (over `REFRESH_MAX_SHARE` of it changed, or removed slots over half the
        live ones): the caller builds one. This view must not be served after."""
        moved = [i for i, h in hashes.items() if self.hashes.get(i) != h]  # new or re-embedded
        moved_set = set(moved)
        gone = [k for i, k in self.keys.items() if i not in hashes or i in moved_set]
        tombstones = len(self.ids) - len(self.keys) + len(gone)
        if len(gone) + len(moved) > REFRESH_MAX_SHARE * len(hashes) or tombstones > len(hashes) // 2:
            return None
        gone_ids = {self.ids[k] for k in gone}
        keys = {i: k for i, k in self.keys.items() if i not in gone_ids}
        kept = {i: h for i, h in self.hashes.items() if i in keys}
        if gone:
            with self.lock:
                self.index.remove(np.array(gone, dtype=np.uint64))
        patched = ViewVectors(list(self.ids), keys, kept, self.index, self.lock)
        return patched._with_added(*fetch(moved), cancelled) if moved else patched

    def _with_added(self, ids: list[str], matrix: np.ndarray, hashes: Sequence[int] | None,
                    cancelled: Callable[[], bool]) -> ViewVectors:
        """Add these memories' vectors to the graph (new keys after `ids`'s slots), in chunks."""
        first = len(self.ids)
        for start in range(0, len(ids), BUILD_CHUNK):
            if cancelled():
                raise BuildCancelled
            stop = min(start + BUILD_CHUNK, len(ids))
            with self.lock:
                self.index.add(np.arange(first + start, first + stop, dtype=np.uint64), matrix[start:stop], threads=1)
        self.ids.extend(ids)
        self.keys.update(zip(ids, range(first, first + len(ids)), strict=True))
        if hashes is not None:
            self.hashes.update(zip(ids, hashes, strict=True))
        return self

    def nearest(self, query: np.ndarray, n: int) -> list[tuple[str, float]]:
        """The n nearest memories (approximately, as vss's index): (id, cosine), best first."""
        if not self.keys:
            return []
        with self.lock:
            found = self.index.search(query, min(n, len(self.keys)))
        rows = []
        for key, distance in zip(found.keys, found.distances):
            key = int(key)
            if key < len(self.ids) and self.keys.get(self.ids[key]) == key:  # not patched in since
                rows.append((self.ids[key], 1.0 - float(distance)))
        rows.sort(key=lambda r: (-r[1], r[0]))
        return rows

    def similarities(self, query: np.ndarray, memory_ids: Sequence[str]) -> dict[str, float]:
        found = [(i, self.keys[i]) for i in memory_ids if i in self.keys]
        if not found:
            return {}
        with self.lock:
            vectors = self.index.get(np.array([k for _, k in found], dtype=np.uint64), dtype=np.float32)
        if isinstance(vectors, tuple):  # some keys were removed: a newer view patched the graph
            kept = [(f, v) for f, v in zip(found, vectors, strict=True) if v is not None]
            if not kept:
                return {}
            found, vectors = [f for f, _ in kept], [v for _, v in kept]
        scores = np.asarray(vectors).reshape(len(found), EMBEDDING_DIM) @ query
        return {i: float(s) for (i, _), s in zip(found, scores)}


@dataclass(frozen=True, slots=True)
class ViewPostings:
    """A user's rows of the BM25 postings table, sorted by term (the postings of a term are
    found by binary search in `termids`): each a document (an index into `docs` and
    `lengths`) and the term's frequency in it."""

    text_generation: int  # of the text index they were read from
    docs: list[str]
    lengths: np.ndarray  # (docs,) document lengths in terms
    termids: np.ndarray  # (postings,) sorted
    doc_rows: np.ndarray  # (postings,)
    tfs: np.ndarray  # (postings,)

    def top(self, terms: Sequence[tuple[int, int]], num_docs: int, avgdl: float, n: int) -> list[tuple[str, float]]:
        """BM25 of the user's documents for (termid, document frequency) pairs: n best (id, score),
        ties in id order, as `memory.indexes.BM25_SQL` computes it."""
        scores = np.zeros(len(self.docs), dtype=np.float64)
        for termid, df in terms:
            lo, hi = np.searchsorted(self.termids, [termid, termid + 1])
            if lo == hi:
                continue
            rows, tf = self.doc_rows[lo:hi], self.tfs[lo:hi]  # a document once per term
            idf = np.log(1 + (num_docs - df + 0.5) / (df + 0.5))
            norm = 1 - BM25_B + BM25_B * self.lengths[rows] / avgdl
            scores[rows] += idf * tf * (BM25_K1 + 1) / (tf + BM25_K1 * norm)
        hit = np.flatnonzero(scores)
        if len(hit) > n:  # a common word matches thousands: keep the n best, and their ties
            nth = np.partition(scores[hit], len(hit) - n)[len(hit) - n]
            hit = hit[scores[hit] >= nth]
        best = hit[np.lexsort((hit, -scores[hit]))][:n]  # documents are in id order: ties by id
        return [(self.docs[i], float(scores[i])) for i in best]


def load_postings(cursor: duckdb.DuckDBPyConnection, user_id: str, text_generation: int) -> ViewPostings:
    """The user's postings (one query over the table sorted by user and term)."""
    table = arrow_table(cursor.execute(
        "SELECT termid, id, len, tf FROM memory_postings WHERE user_id = ? ORDER BY termid, id", [user_id]
    ))
    ids = table.column("id").to_numpy(zero_copy_only=False)
    docs, doc_rows = np.unique(ids, return_inverse=True)
    lengths = np.zeros(len(docs), dtype=np.float64)
    lengths[doc_rows] = table.column("len").to_numpy(zero_copy_only=False)
    return ViewPostings(
        text_generation, docs.tolist(), lengths,
        table.column("termid").to_numpy(zero_copy_only=False).astype(np.int64),
        doc_rows.astype(np.int64), table.column("tf").to_numpy(zero_copy_only=False).astype(np.float64),
    )


@dataclass(frozen=True, slots=True)
class UserView:
    """One user's memories (history included, without relations), links and conversations."""

    entries: dict[str, MemoryEntry]
    links: dict[str, tuple[Link, ...]]  # memory id -> links with it at either end
    conversations: dict[str, tuple[str, ...]]  # memory id -> conversation ids it was learned in
    members: dict[str, tuple[str, ...]]  # conversation id -> memory ids learned in it
    signature: tuple[int, datetime | None]  # (current memories, their latest update)
    vectors: ViewVectors | None = None  # large users only (above ANN_MIN_ROWS vectors)
    postings: ViewPostings | None = None  # None: no text index yet
    row_hashes: dict[str, int] | None = None  # memory id -> DuckDB's hash of its row when read

    def get_many(self, memory_ids: Sequence[str]) -> list[MemoryEntry]:
        return [self.entries[i] for i in dict.fromkeys(memory_ids) if i in self.entries]

    def links_from(self, memory_ids: Sequence[str]) -> list[Link]:
        seen: dict[tuple[str, str, str], Link] = {}
        for memory_id in memory_ids:
            for link in self.links.get(memory_id, ()):
                seen.setdefault((link.src_id, link.dst_id, link.kind), link)
        return list(seen.values())

    def conversation_neighbours(self, memory_ids: Sequence[str], limit: int) -> list[tuple[str, str, int]]:
        """(seed, neighbour, the seed's neighbour count), as `MemoryStore.conversation_neighbours`:
        current memories learned in a conversation of the seed, counted before `limit` cuts."""
        found: dict[str, dict[str, None]] = {}
        for seed in dict.fromkeys(memory_ids):
            others: dict[str, None] = {}
            for conversation in self.conversations.get(seed, ()):
                for other in self.members.get(conversation, ()):
                    entry = self.entries.get(other)
                    if other != seed and entry is not None and entry.valid_to is None:
                        others[other] = None
            if others:
                found[seed] = others
        pairs = [(seed, other, len(others)) for seed, others in found.items() for other in others]
        return pairs[:limit]

    def with_access(self, counts: dict[str, int], at: datetime) -> UserView:
        """This view with `counts` more retrievals of some memories, the last one `at`."""
        entries = dict(self.entries)
        for memory_id, n in counts.items():
            entry = entries.get(memory_id)
            if entry is not None:
                last = at if entry.last_accessed is None else max(entry.last_accessed, at)
                entries[memory_id] = replace(entry, access_count=entry.access_count + n, last_accessed=last)
        return replace(self, entries=entries)

    def with_scores(self, changes: dict[str, dict[str, float]]) -> UserView:
        """This view with new `recency` or `importance` values for some memories (memory id ->
        {name: value}): what maintenance and consolidation move without changing a memory."""
        entries = dict(self.entries)
        for memory_id, values in changes.items():
            entry = entries.get(memory_id)
            if entry is None:
                continue
            if "recency" in values:
                entry = replace(entry, confidence=replace(entry.confidence, recency=values["recency"]))
            if "importance" in values:
                entry = replace(entry, importance=values["importance"])
            entries[memory_id] = entry
        return replace(self, entries=entries)


def load_view(
    cursor: duckdb.DuckDBPyConnection, user_id: str, *, text_generation: int = 0,
    ann_min_rows: int = ANN_MIN_ROWS, cancelled: Callable[[], bool] = lambda: False,
    previous: UserView | None = None,
) -> UserView:
    """Read one user's memories, links, conversation sources and postings; for a large user
    also their vectors, into an HNSW graph (~40 s per 100k on one core).

    With `previous`, the user's last view (dropped by a write since), only the memories whose
    row changed are read again (DuckDB's row hash tells them apart; the rest are taken from
    `previous`) and its graph is patched (`ViewVectors.refreshed`) instead of built anew."""
    from memory.indexes import fetch_hashed_vectors  # indexes imports this module

    entries, row_hashes = _load_entries(cursor, user_id, previous)
    links: dict[str, list[Link]] = {}
    for src, dst, kind, weight in cursor.execute(
        "SELECT src_id, dst_id, kind, weight FROM memory_links WHERE user_id = ?", [user_id]
    ).fetchall():
        link = Link(src, dst, kind, weight)
        links.setdefault(src, []).append(link)
        if dst != src:
            links.setdefault(dst, []).append(link)
    conversations: dict[str, list[str]] = {}
    members: dict[str, list[str]] = {}
    for memory_id, conversation in cursor.execute(
        "SELECT DISTINCT memory_id, conversation_id FROM memory_sources "
        "WHERE user_id = ? AND conversation_id IS NOT NULL ORDER BY memory_id, conversation_id",
        [user_id],
    ).fetchall():
        conversations.setdefault(memory_id, []).append(conversation)
        members.setdefault(conversation, []).append(memory_id)
    current = [e.updated_at for e in entries.values() if e.valid_to is None]
    vectors = postings = None
    if len(entries) > ann_min_rows:
        if previous is not None and previous.vectors is not None:
            vectors = previous.vectors.refreshed(
                _vector_hashes(cursor, user_id), lambda ids: fetch_hashed_vectors(cursor, user_id, ids),
                cancelled=cancelled)
        if vectors is None:
            vectors = ViewVectors.build(*fetch_hashed_vectors(cursor, user_id), cancelled=cancelled)
    try:
        postings = load_postings(cursor, user_id, text_generation)
    except duckdb.CatalogException:  # no text index yet: BM25 reads DuckDB (and finds nothing)
        postings = None
    return UserView(
        entries,
        {k: tuple(v) for k, v in links.items()},
        {k: tuple(v) for k, v in conversations.items()},
        {k: tuple(v) for k, v in members.items()},
        (len(current), max(current, default=None)),
        vectors,
        postings,
        row_hashes,
    )


def _load_entries(cursor: duckdb.DuckDBPyConnection, user_id: str,
                  previous: UserView | None) -> tuple[dict[str, MemoryEntry], dict[str, int]]:
    """The user's memories and their row hashes; those whose hash `previous` holds are taken
    from it (reading and converting rows is most of a view's reload: ~3 s per 100k)."""
    select = f"SELECT {ENTRY_COLUMNS}, hash(m) FROM memories m WHERE user_id = ?"
    if previous is None or previous.row_hashes is None:
        rows = cursor.execute(select, [user_id]).fetchall()
        return {r[0]: entry_from_row(r[:-1]) for r in rows}, {r[0]: r[-1] for r in rows}
    table = arrow_table(cursor.execute("SELECT id, hash(m) FROM memories m WHERE user_id = ?", [user_id]))
    now = dict(zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True))
    changed = {i for i, h in now.items() if previous.row_hashes.get(i) != h}
    # Read again: the rows that changed, each with the hash of what was read, since a row may
    # change again between the two queries (the next reload then reads it once more).
    rows = cursor.execute(f"{select} AND list_contains(?, id)", [user_id, list(changed)]).fetchall() if changed else []
    fresh = {r[0]: (entry_from_row(r[:-1]), r[-1]) for r in rows}
    entries: dict[str, MemoryEntry] = {}
    hashes: dict[str, int] = {}
    for memory_id in now:
        if memory_id in fresh:
            entries[memory_id], hashes[memory_id] = fresh[memory_id]
        elif memory_id not in changed:
            entries[memory_id], hashes[memory_id] = previous.entries[memory_id], previous.row_hashes[memory_id]
    return entries, hashes


def _vector_hashes(cursor: duckdb.DuckDBPyConnection, user_id: str) -> dict[str, int]:
    table = arrow_table(cursor.execute(
        "SELECT id, hash(embedding) FROM memory_vectors WHERE user_id = ?", [user_id]
    ))
    return dict(zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True))


class ViewCache:
    """The views of recently searched users, least recently used dropped first.

    `generation(user)` is read before a build and passed to `install`, which refuses the view
    if the user's memories changed in between (`invalidate` bumps the generation). A dropped
    or refused view of a large user (one with an HNSW graph) waits in `_previous` for the
    user's next build to update (`take_previous`), and counts against `max_rows` until then."""

    def __init__(self, max_rows: int = VIEW_CACHE_MAX_ROWS, settle_s: float = VIEW_SETTLE_S) -> None:
        self.max_rows = max_rows
        self.settle_s = settle_s
        self._views: OrderedDict[str, UserView] = OrderedDict()
        self._previous: OrderedDict[str, UserView] = OrderedDict()  # dropped views of large users
        self._unkept: set[str] = set()  # users whose previous view a delete dropped since their last install
        self._generations: dict[str, int] = {}
        self._building: set[str] = set()
        self._changed_at: dict[str, float] = {}  # user id -> time.monotonic() of the last write
        self._epoch = 0  # bumped by invalidate(None): every generation read before is stale
        self._lock = threading.Lock()

    def get(self, user_id: str) -> UserView | None:
        with self._lock:
            view = self._views.get(user_id)
            if view is not None:
                self._views.move_to_end(user_id)
            return view

    def generation(self, user_id: str) -> tuple[int, int]:
        with self._lock:
            return self._epoch, self._generations.get(user_id, 0)

    def claim(self, user_id: str) -> bool:
        """True if nobody is building this user's view (the caller now is) and the user's
        memories have not changed in the last `settle_s`: while a user is being written
        (maintenance, an import) every build would be thrown away, so reads go to DuckDB."""
        with self._lock:
            if user_id in self._building or user_id in self._views:
                return False
            if time.monotonic() - self._changed_at.get(user_id, float("-inf")) < self.settle_s:
                return False
            self._building.add(user_id)
            return True

    def install(self, user_id: str, view: UserView, generation: tuple[int, int]) -> bool:
        with self._lock:
            self._building.discard(user_id)
            if generation != (self._epoch, self._generations.get(user_id, 0)):
                if user_id not in self._unkept:
                    self._keep_previous(user_id, view)  # the next build updates it, as it is now
                self._unkept.discard(user_id)
                return False
            self._unkept.discard(user_id)
            self._views[user_id] = view
            self._views.move_to_end(user_id)
            self._trim()
            return True

    def take_previous(self, user_id: str) -> UserView | None:
        """The user's last view (dropped since), for their next build to update; no one else may."""
        with self._lock:
            return self._previous.pop(user_id, None)

    def drop_previous(self, user_id: str) -> None:
        """After a delete or a wipe: the user's next view is built anew, so that what they deleted
        (rows, vectors) does not stay in RAM until then."""
        with self._lock:
            self._previous.pop(user_id, None)
            self._unkept.add(user_id)  # a build updating it now must not put it back

    def _keep_previous(self, user_id: str, view: UserView | None) -> None:
        if view is not None and view.vectors is not None:
            self._previous[user_id] = view
            self._previous.move_to_end(user_id)
            self._trim()

    def _trim(self) -> None:
        """Drop kept previous views, then least recently used views, until all fit in `max_rows`."""
        def held() -> int:
            return sum(len(v.entries) for views in (self._views, self._previous) for v in views.values())

        while self._previous and held() > self.max_rows:
            self._previous.popitem(last=False)
        while len(self._views) > 1 and held() > self.max_rows:
            self._views.popitem(last=False)

    def replace_view(self, user_id: str, old: UserView, new: UserView) -> bool:
        """Put `new` in place of `old` (the same memories with fresher postings), unless `old`
        was dropped or replaced meanwhile."""
        with self._lock:
            if self._views.get(user_id) is not old:
                return False
            self._views[user_id] = new
            return True

    def abandon(self, user_id: str) -> None:
        with self._lock:
            self._building.discard(user_id)

    def invalidate(self, user_id: str | None) -> None:
        """Drop a user's view (None: everyone's) after a write to their memories."""
        with self._lock:
            if user_id is None:
                self._epoch += 1
                self._views.clear()
                self._previous.clear()
            else:
                self._generations[user_id] = self._generations.get(user_id, 0) + 1
                self._keep_previous(user_id, self._views.pop(user_id, None))
                self._changed_at[user_id] = time.monotonic()

    def patch_scores(self, changes: dict[str, dict[str, dict[str, float]]]) -> None:
        """Apply `recency` and `importance` values just committed (user -> memory -> {name:
        value}) to the views that hold them, instead of dropping the views: a decay pass or a
        consolidation moves a few rows of a large user each time, and rebuilding a 10,000-memory
        view took ~0.5 s, much of it holding the GIL. A build in flight read the old rows: it is
        discarded (the generation moves on)."""
        with self._lock:
            for user_id, per_memory in changes.items():
                self._generations[user_id] = self._generations.get(user_id, 0) + 1
                view = self._views.get(user_id)
                if view is not None:
                    self._views[user_id] = view.with_scores(per_memory)

    def patch_access(self, counts: Iterable[tuple[str, dict[str, int]]], at: datetime) -> None:
        """Apply retrievals just written to the database to the views that hold them."""
        with self._lock:
            for user_id, per_memory in counts:
                view = self._views.get(user_id)
                if view is not None:
                    self._views[user_id] = view.with_access(per_memory, at)
