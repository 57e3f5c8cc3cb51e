"""Opening DuckDB connections and loading the bundled vss / fts extensions.

DuckDB extensions are built for one exact DuckDB version and `INSTALL` needs the
network, so memlane never installs or autoloads them: it loads the binaries shipped
in the `duckdb-extension-<name>` wheels, which must match `duckdb.__version__`.

A loaded extension belongs to the database instance, so cursors made from a
connection (`conn.cursor()`) see it without loading it again.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

import duckdb

__all__ = [
    "ATTACHED_NAME",
    "ExtensionNotFoundError",
    "connect",
    "extension_path",
    "load_extensions",
]

DEFAULT_EXTENSIONS = ("vss", "fts")
# Writing an encrypted database needs OpenSSL, which DuckDB takes from httpfs; without it
# DuckDB only reads encrypted files. memlane never uses httpfs for anything else.
CRYPTO_EXTENSION = "httpfs"
ATTACHED_NAME = "memlane"  # an encrypted file is attached under this name

# Never fetch or silently load extensions: every one we use is loaded explicitly.
CONNECTION_CONFIG = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
}


class ExtensionNotFoundError(RuntimeError):
    """The extension binary for this DuckDB version is not installed."""


def extension_path(name: str) -> Path:
    """Path of `<name>.duckdb_extension` for the running DuckDB version."""
    package = f"duckdb_extension_{name}"
    wanted = f"duckdb-extension-{name}=={duckdb.__version__}"
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ExtensionNotFoundError(
            f"DuckDB extension {name!r} is not installed; install {wanted}"
        )
    versions_dir = Path(next(iter(spec.submodule_search_locations))) / "extensions"
    path = versions_dir / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
    if not path.is_file():
        available = sorted(p.name for p in versions_dir.glob("v*")) or ["none"]
        raise ExtensionNotFoundError(
            f"DuckDB extension {name!r} has no build for DuckDB {duckdb.__version__} "
            f"(found: {', '.join(available)}); install {wanted}"
        )
    return path


def load_extensions(
    conn: duckdb.DuckDBPyConnection, names: Iterable[str] = DEFAULT_EXTENSIONS
) -> None:
    """LOAD each named extension from its wheel into the connection's database."""
    for name in names:
        literal = str(extension_path(name)).replace("'", "''")
        conn.execute(f"LOAD '{literal}'")


def connect(
    database: str | Path,
    *,
    read_only: bool = False,
    extensions: Iterable[str] = DEFAULT_EXTENSIONS,
    encryption_key: str | None = None,
) -> duckdb.DuckDBPyConnection:
    """Open a connection with autoinstall/autoload off and `extensions` loaded.

    With `encryption_key` the file is encrypted (DuckDB's AES-GCM): it is attached to an
    in-memory database as `ATTACHED_NAME` and made the default; every cursor made from the
    connection must `USE` it again. A wrong key fails here, naming the problem.
    """
    if encryption_key is None:
        conn = duckdb.connect(str(database), read_only=read_only, config=CONNECTION_CONFIG)
    else:
        if not encryption_key:
            raise ValueError("the encryption key is empty")
        conn = duckdb.connect(":memory:", config=CONNECTION_CONFIG)
    try:
        load_extensions(conn, extensions)
        if encryption_key is not None:
            load_extensions(conn, [CRYPTO_EXTENSION])
            path = str(database).replace("'", "''")
            key = encryption_key.replace("'", "''")
            mode = ", READ_ONLY" if read_only else ""
            conn.execute(f"ATTACH '{path}' AS {ATTACHED_NAME} (ENCRYPTION_KEY '{key}'{mode})")
            conn.execute(f"USE {ATTACHED_NAME}")
    except BaseException:
        conn.close()
        raise
    return conn
