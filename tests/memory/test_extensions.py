import threading

import duckdb
import pytest

from memory import ExtensionNotFoundError, connect
from memory.extensions import extension_path


def loaded_extensions(conn: duckdb.DuckDBPyConnection) -> set[str]:
    rows = conn.execute("SELECT extension_name FROM duckdb_extensions() WHERE loaded").fetchall()
    return {name for (name,) in rows}


def test_connect_loads_vss_and_fts_for_cursors_in_other_threads() -> None:
    conn = connect(":memory:")
    seen: list[set[str]] = []

    def in_thread() -> None:
        cursor = conn.cursor()
        seen.append(loaded_extensions(cursor))
        cursor.close()

    try:
        assert {"vss", "fts"} <= loaded_extensions(conn)
        thread = threading.Thread(target=in_thread)
        thread.start()
        thread.join()
    finally:
        conn.close()
    assert {"vss", "fts"} <= seen[0]


def test_connections_never_autoload_extensions() -> None:
    conn = connect(":memory:", extensions=())
    try:
        assert "vss" not in loaded_extensions(conn)
        with pytest.raises(duckdb.Error):
            conn.execute("CREATE TABLE t (v FLOAT[3])")
            conn.execute("CREATE INDEX i ON t USING HNSW (v)")
    finally:
        conn.close()


def test_extension_paths_match_the_duckdb_version() -> None:
    path = extension_path("vss")
    assert path.is_file() and path.parent.name == f"v{duckdb.__version__}"


def test_a_missing_extension_says_what_to_install() -> None:
    with pytest.raises(ExtensionNotFoundError, match=r"duckdb-extension-nosuch==\d"):
        extension_path("nosuch")
