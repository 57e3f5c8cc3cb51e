"""The Personal Memory System: embeddings, the DuckDB store and its schema.

Other packages import only the names below.
"""

from memory.embed import BatchingEmbedder, Embedder, HashEmbedder, MiniLMEmbedder
from memory.extensions import ExtensionNotFoundError, connect, load_extensions
from memory.migrations import MIGRATIONS, MigrationError
from memory.store import (
    EMBEDDING_DIM,
    Clock,
    InteractionRecord,
    Memory,
    MemoryStore,
    ReadOnlyStoreError,
    StoreClosedError,
    SystemClock,
    content_hash,
)

__all__ = [
    "EMBEDDING_DIM",
    "MIGRATIONS",
    "BatchingEmbedder",
    "Clock",
    "Embedder",
    "ExtensionNotFoundError",
    "HashEmbedder",
    "InteractionRecord",
    "Memory",
    "MemoryStore",
    "MigrationError",
    "MiniLMEmbedder",
    "ReadOnlyStoreError",
    "StoreClosedError",
    "SystemClock",
    "connect",
    "content_hash",
    "load_extensions",
]
