"""What a user controls: export and import without loss, forgetting and wiping leave nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from memory import (
    DuplicateContentError,
    HashEmbedder,
    ImportFormatError,
    InteractionRecord,
    Link,
    MemorySource,
    MemoryStore,
    MemoryType,
    Tier,
    edit_memory,
    entry_to_dict,
    export_jsonl,
    export_parquet,
    import_jsonl,
    import_parquet,
)
from tests.memory.conftest import StepClock

TABLES = ("memories", "memory_vectors", "memory_sources", "memory_links", "interactions")
FORMATS = {"jsonl": (export_jsonl, import_jsonl), "parquet": (export_parquet, import_parquet)}


@pytest.fixture
def fresh() -> Iterator[MemoryStore]:
    with MemoryStore.open(":memory:", embedder=HashEmbedder(), clock=StepClock(datetime(2026, 3, 1))) as opened:
        yield opened


def fill(store: MemoryStore, user: str = "ada") -> dict[str, str]:
    """Memories with every kind of state: history, corroboration, links, sources, tags."""
    paris, _ = store.add(user, "The user lives in Paris.")
    berlin, _ = store.add(user, "The user lives in Berlin.",
                          source=MemorySource("interaction", "req_1", "rules", "conv-1"))
    name, _ = store.add(user, "The user's name is Ada.")
    store.add(user, "The user's name is Ada.", source=MemorySource("interaction", "req_2", "llm:m", "conv-1"))
    tea, _ = store.add(user, "The user drinks green tea every morning.", tags=["food"], domains=["health"],
                       importance=0.8)
    drinks, _ = store.add(user, "The user likes hot drinks.", derived_from=[tea.id],
                          memory_type=MemoryType.PREFERENCE)
    store.add_links(user, [Link(tea.id, name.id, "supports", 0.7)])
    store.record_access(user, [tea.id])
    store.flush()
    return {"paris": paris.id, "berlin": berlin.id, "name": name.id, "tea": tea.id, "drinks": drinks.id}


def snapshot(store: MemoryStore, user: str) -> tuple[list[dict], dict[str, list[float]], list]:
    entries = store.list(user, limit=1000, include_history=True)
    ids = [e.id for e in entries]
    vectors = {i: v.tolist() for i, v in store.vectors_of(user, ids).items()}
    return [entry_to_dict(e) for e in entries], vectors, store.links_with_times(user, ids)


def rows(store: MemoryStore, sql: str, params: list) -> list[tuple]:
    return store._cursor().execute(sql, params).fetchall()  # straight at the tables


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_then_import_into_an_empty_store_gives_back_exactly_the_same_memories(
    store: MemoryStore, fresh: MemoryStore, tmp_path: Path, fmt: str
) -> None:
    export, import_ = FORMATS[fmt]
    ids = fill(store)
    first, second = tmp_path / f"a.{fmt}", tmp_path / f"b.{fmt}"
    assert export(store, "ada", first) == 5  # the superseded Paris memory is exported too

    report = import_(fresh, "ada", first)
    assert (report.imported, report.skipped, report.links) == (5, 0, 4)
    export(fresh, "ada", second)

    entries, vectors, links = snapshot(fresh, "ada")
    assert (entries, vectors, links) == snapshot(store, "ada")
    assert {e["id"] for e in entries} == set(ids.values())
    paris = next(e for e in entries if e["id"] == ids["paris"])
    assert paris["superseded_by"] == ids["berlin"] and paris["valid_to"] is not None
    name = next(e for e in entries if e["id"] == ids["name"])
    assert [s["conversation_id"] for s in name["sources"]] == [None, "conv-1"]
    assert fresh.identity_since_of("ada", [ids["name"]]) == store.identity_since_of("ada", [ids["name"]])
    if fmt == "jsonl":
        assert first.read_text() == second.read_text()
    else:
        assert pq.read_table(first).equals(pq.read_table(second))
    # the restored memories are searchable at once, by words and by meaning
    assert fresh.search_text("ada", "green tea", k=1)[0].id == ids["tea"]


def test_importing_the_same_file_twice_changes_nothing(store: MemoryStore, tmp_path: Path) -> None:
    fill(store)
    path = tmp_path / "ada.jsonl"
    export_jsonl(store, "ada", path)
    before = snapshot(store, "ada")
    report = import_jsonl(store, "ada", path)
    assert (report.imported, report.skipped) == (0, 5)
    assert snapshot(store, "ada") == before


def test_importing_into_another_user_gives_them_their_own_ids_and_keeps_the_history(
    store: MemoryStore, tmp_path: Path
) -> None:
    ids = fill(store)
    path = tmp_path / "ada.parquet"
    export_parquet(store, "ada", path)
    ada_before = snapshot(store, "ada")

    assert import_parquet(store, "bob", path).imported == 5
    assert import_parquet(store, "bob", path).imported == 0  # the new ids are stable

    assert snapshot(store, "ada") == ada_before
    bob = {e.content: e for e in store.list("bob", include_history=True)}
    assert len(bob) == 5 and not set(ids.values()) & {e.id for e in bob.values()}
    paris, berlin = bob["The user lives in Paris."], bob["The user lives in Berlin."]
    assert paris.superseded_by == berlin.id and berlin.supersedes == paris.id
    assert berlin.contradicts == (paris.id,)
    assert [e.content for e in store.list("bob")] == [e.content for e in store.list("ada")]
    ada_vectors = store.vectors_of("ada", [ids["tea"]])[ids["tea"]]
    tea = bob["The user drinks green tea every morning."]
    assert np.array_equal(store.vectors_of("bob", [tea.id])[tea.id], ada_vectors)
    # forgetting bob's copy follows bob's own derived_from link, and leaves ada's alone
    assert len(store.delete_entries("bob", [tea.id])) == 2
    assert store.get("ada", ids["drinks"]) is not None


@pytest.mark.parametrize(
    "line",
    ["not json", "[1, 2]", '{"id": "x"}'],
)
def test_a_file_that_is_not_an_export_is_refused(fresh: MemoryStore, tmp_path: Path, line: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ImportFormatError):
        import_jsonl(fresh, "ada", path)
    assert fresh.count("ada") == 0


def test_a_record_with_a_wrong_sized_embedding_is_refused_and_its_batch_not_imported(
    store: MemoryStore, fresh: MemoryStore, tmp_path: Path
) -> None:
    fill(store)
    path = tmp_path / "ada.jsonl"
    export_jsonl(store, "ada", path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[-1]["embedding"] = records[-1]["embedding"][:10]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ImportFormatError):
        import_jsonl(fresh, "ada", path)
    assert fresh.count("ada") == 0


def test_a_parquet_file_that_is_not_parquet_is_refused(fresh: MemoryStore, tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 but not really")
    with pytest.raises(ImportFormatError):
        import_parquet(fresh, "ada", path)


def test_an_empty_export_imports_as_nothing(store: MemoryStore, fresh: MemoryStore, tmp_path: Path) -> None:
    for export, import_ in FORMATS.values():
        path = tmp_path / f"empty.{export.__name__}"
        assert export(store, "nobody", path) == 0
        assert import_(fresh, "nobody", path).imported == 0


def test_forgetting_a_memory_removes_it_and_everything_derived_from_it_from_every_table_and_index(
    store: MemoryStore,
) -> None:
    ids = fill(store)
    grandchild, _ = store.add("ada", "The user enjoys cocoa in winter.", derived_from=[ids["drinks"]])
    other, _ = store.add("bob", "The user drinks green tea too.")
    store.refresh_text_index()

    deleted = store.delete_entries("ada", [ids["tea"]])

    gone = [ids["tea"], ids["drinks"], grandchild.id]
    assert sorted(deleted) == sorted(gone)
    for table, column in (("memories", "id"), ("memory_vectors", "id"), ("memory_sources", "memory_id")):
        assert rows(store, f"SELECT * FROM {table} WHERE list_contains(?, {column})", [gone]) == []
    assert rows(store, "SELECT * FROM memory_links WHERE list_contains(?, src_id) OR list_contains(?, dst_id)",
                [gone, gone]) == []
    assert rows(store, "SELECT * FROM fts_main_memories.docs WHERE list_contains(?, name)", [gone]) == []
    assert rows(store, "SELECT * FROM fts_main_memories.dict WHERE term = 'cocoa'", []) == []
    assert store.search_text("ada", "cocoa hot drinks green tea", k=10, min_score=0.2) == []
    assert {e.id for e in store.list("ada")} == {ids["berlin"], ids["name"]}
    assert store.get("bob", other.id) is not None


def test_forgetting_someone_elses_memory_deletes_nothing(store: MemoryStore) -> None:
    ids = fill(store)
    assert store.delete_entries("bob", [ids["tea"]]) == []
    assert store.get("ada", ids["tea"]) is not None


def _interaction(request_id: str, user: str) -> InteractionRecord:
    return InteractionRecord(
        request_id=request_id, user_id=user, created_at=datetime(2026, 1, 1), model="gpt-4o-mini",
        provider="openai", stream=False, status_code=200, error=None,
        request_received={"messages": [{"role": "user", "content": "hi"}]}, request_sent=None,
        response={"choices": []}, usage=None, latency_ms=12.0, ttft_ms=None, conversation_id="conv-1",
    )


def test_wiping_a_user_leaves_nothing_of_theirs_keeps_everyone_else_and_calls_the_hooks(
    store: MemoryStore,
) -> None:
    ada, bob = fill(store, "ada"), fill(store, "bob")
    store.add("ada", "The user collects zanzibarian stamps.")
    store.log_interactions([_interaction("req_a1", "ada"), _interaction("req_a2", "ada"),
                            _interaction("req_b1", "bob")])
    store.refresh_text_index()
    bob_before = {t: rows(store, f"SELECT count(*) FROM {t} WHERE user_id = 'bob'", [])[0][0] for t in TABLES}
    called: list[str] = []
    store.wipe_hooks.append(called.append)

    counts = store.wipe_user("ada")

    assert called == ["ada"]
    assert counts["memories"] == 6 and counts["interactions"] == 2
    for table in TABLES:
        assert rows(store, f"SELECT count(*) FROM {table} WHERE user_id = 'ada'", [])[0][0] == 0, table
    ada_ids = list(ada.values())
    assert rows(store, "SELECT * FROM fts_main_memories.docs WHERE list_contains(?, name)", [ada_ids]) == []
    assert rows(store, "SELECT * FROM fts_main_memories.dict WHERE term LIKE 'zanzibar%'", []) == []
    assert store.interactions(user_id="ada") == [] and store.list("ada", include_history=True) == []
    assert {t: rows(store, f"SELECT count(*) FROM {t} WHERE user_id = 'bob'", [])[0][0] for t in TABLES} == bob_before
    assert store.search_text("bob", "green tea", k=1)[0].id == bob["tea"]


def test_editing_content_re_embeds_rehashes_and_reparses_it(store: MemoryStore) -> None:
    ids = fill(store)
    before = store.vectors_of("ada", [ids["berlin"]])[ids["berlin"]]
    edited = edit_memory(store, "ada", ids["berlin"], content="The user lives in Lisbon.")
    assert edited is not None and edited.content == "The user lives in Lisbon."
    assert edited.value == "lisbon" and edited.content_hash != store.get("ada", ids["paris"]).content_hash
    assert not np.array_equal(store.vectors_of("ada", [ids["berlin"]])[ids["berlin"]], before)
    store.refresh_text_index()
    assert store.search_text("ada", "Lisbon", k=1)[0].id == ids["berlin"]
    # stating the new value again corroborates the edited memory instead of duplicating it
    again, created = store.add("ada", "The user lives in Lisbon.")
    assert again.id == ids["berlin"] and not created


def test_editing_tier_tags_and_the_rest(store: MemoryStore, clock: StepClock) -> None:
    ids = fill(store)
    edited = edit_memory(store, "ada", ids["tea"], tier=Tier.SHORT_TERM, tags=["identity"], importance=0.1,
                         validated=False, domains=["food"])
    assert edited is not None
    assert (edited.tier, edited.tags, edited.importance, edited.validated, edited.domains) == (
        Tier.SHORT_TERM, ("identity",), 0.1, False, ("food",))
    assert edited.expires_at is not None and edited.expires_at > edited.updated_at
    assert ids["tea"] in store.identity_since_of("ada", [ids["tea"]])
    promoted = edit_memory(store, "ada", ids["tea"], tier=Tier.PERSISTENT, tags=[])
    assert promoted.expires_at is None and store.identity_since_of("ada", [ids["tea"]]) == {}


def test_an_edit_cannot_duplicate_another_current_memory_nor_touch_another_users(store: MemoryStore) -> None:
    ids = fill(store)
    with pytest.raises(DuplicateContentError) as caught:
        edit_memory(store, "ada", ids["tea"], content="the user likes hot drinks")
    assert caught.value.existing_id == ids["drinks"]
    assert edit_memory(store, "bob", ids["tea"], importance=1.0) is None
    assert store.get("ada", ids["tea"]).importance == 0.8
