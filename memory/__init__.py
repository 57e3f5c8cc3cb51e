"""The Personal Memory System: memory entries in three tiers, their DuckDB store, embeddings,
hybrid retrieval, promotion and forgetting, export and import.

Other packages import only the names below.
"""

from memory.embed import BatchingEmbedder, Embedder, HashEmbedder, MiniLMEmbedder
from memory.entry import (
    Confidence,
    MemoryEntry,
    MemorySource,
    MemoryType,
    ScoreParts,
    Tier,
    TruthCategory,
    entry_from_dict,
    entry_to_dict,
)
from memory.extensions import ExtensionNotFoundError, connect, load_extensions
from memory.interactions import InteractionRecord
from memory.migrations import MIGRATIONS, MigrationError
from memory.ownership import (
    DuplicateContentError,
    ImportFormatError,
    ImportReport,
    edit_memory,
    export_jsonl,
    export_parquet,
    import_jsonl,
    import_parquet,
)
from memory.relations import content_hash, parse_relation
from memory.remember import RememberResult
from memory.retrieve import RetrievalWeights, candidate_count
from memory.store import (
    EMBEDDING_DIM,
    Clock,
    Link,
    MemoryStore,
    ReadOnlyStoreError,
    StoreClosedError,
    SystemClock,
)
from memory.tiers import MaintenanceReport, TierPolicy

__all__ = [
    "EMBEDDING_DIM",
    "MIGRATIONS",
    "BatchingEmbedder",
    "Clock",
    "Confidence",
    "DuplicateContentError",
    "Embedder",
    "ExtensionNotFoundError",
    "HashEmbedder",
    "ImportFormatError",
    "ImportReport",
    "InteractionRecord",
    "Link",
    "MaintenanceReport",
    "MemoryEntry",
    "MemorySource",
    "MemoryStore",
    "MemoryType",
    "MigrationError",
    "MiniLMEmbedder",
    "ReadOnlyStoreError",
    "RememberResult",
    "RetrievalWeights",
    "ScoreParts",
    "StoreClosedError",
    "SystemClock",
    "Tier",
    "TierPolicy",
    "TruthCategory",
    "candidate_count",
    "connect",
    "content_hash",
    "edit_memory",
    "entry_from_dict",
    "entry_to_dict",
    "export_jsonl",
    "export_parquet",
    "import_jsonl",
    "import_parquet",
    "load_extensions",
    "parse_relation",
]
