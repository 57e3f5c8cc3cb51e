"""A real fatal DuckDB error, for the tests of what memlane does after one.

DuckDB invalidates a database when a checkpoint fails to write: from then on every query on it
raises `duckdb.FatalException` until it is opened again. A checkpoint is made to fail for real
by lowering the process's file-size limit (RLIMIT_FSIZE) below the size it needs to write,
for the duration of that one statement.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from collections.abc import Iterator

import duckdb

from memory import MemoryStore

BALLAST_ROWS = 2_000  # ~2 MB of WAL: the checkpoint must write past the file's current end


@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def invalidate_database(store: MemoryStore) -> duckdb.FatalException:
    """Make DuckDB invalidate `store`'s database file; returns the error it raised."""
    path = store.database_path()
    assert path is not None, "an in-memory store has no file to fail"
    cursor = store._cursor()
    with store._write_lock:
        cursor.execute("CREATE OR REPLACE TABLE fault_ballast AS "
                       "SELECT i, repeat(md5(i::VARCHAR), 32) AS pad FROM range(?) r(i)", [BALLAST_ROWS])
        with _file_size_limit(os.path.getsize(path)):
            try:
                cursor.execute("CHECKPOINT")
            except duckdb.FatalException as exc:
                return exc
    raise AssertionError("the checkpoint did not fail: DuckDB did not invalidate the database")
