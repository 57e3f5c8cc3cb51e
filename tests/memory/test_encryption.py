"""Encryption at rest: the database file is unreadable without the key from settings."""

import duckdb
import pytest

from memory import HashEmbedder, MemoryStore
from proxy.app import open_store
from proxy.settings import Settings

SECRET = "The user's bank PIN hint is aubergine."


def test_an_encrypted_store_cannot_be_opened_without_its_key(tmp_path):
    path = tmp_path / "secret.duckdb"
    with MemoryStore.open(path, embedder=HashEmbedder(), encryption_key="k3y-one") as store:
        store.add("ada", SECRET, source="api")
        store.add("ada", "The user lives in Porto.", source="api")
        assert not store.has_vector_index  # vss cannot store HNSW in an encrypted file

    assert b"aubergine" not in path.read_bytes()
    with pytest.raises(duckdb.Error, match="encrypted"):
        duckdb.connect(str(path)).execute("SELECT * FROM memories")
    with pytest.raises(duckdb.Error, match="encrypted"):
        MemoryStore.open(path, embedder=HashEmbedder())
    with pytest.raises(duckdb.Error, match="[Ww]rong encryption key"):
        MemoryStore.open(path, embedder=HashEmbedder(), encryption_key="k3y-two")

    with MemoryStore.open(path, embedder=HashEmbedder(), encryption_key="k3y-one") as store:
        found = store.search_text("ada", "aubergine PIN hint", k=1)
        assert [m.content for m in found] == [SECRET]
        assert found[0].score.text > 0 and found[0].score.vector > 0
        assert store.forget("ada", found[0].id)
        assert store.count("ada") == 1


def test_settings_key_encrypts_the_servers_database(tmp_path):
    path = tmp_path / "server.duckdb"
    settings = Settings.from_env({"MEMLANE_DATABASE": str(path), "MEMLANE_DATABASE_KEY": "from-env"})
    assert "from-env" not in repr(settings)  # a secret, never printed
    with open_store(settings, HashEmbedder()) as store:
        store.add("ada", SECRET, source="api")
    with pytest.raises(duckdb.Error):
        MemoryStore.open(path, embedder=HashEmbedder())
    with open_store(settings, HashEmbedder()) as store:
        assert store.count("ada") == 1
