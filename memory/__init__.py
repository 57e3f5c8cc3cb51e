"""The Personal Memory System: memory entries in three tiers, their DuckDB store, embeddings,
hybrid retrieval, promotion and forgetting, export and import.

Other packages import only the names below.
"""

from memory.domains import DomainCount, infer_domains
from memory.embed import BatchingEmbedder, Embedder, HashEmbedder, MiniLMEmbedder
from memory.entry import (
    Confidence,
    MemoryEntry,
    MemorySource,
    MemoryType,
    ScoreParts,
    Sensitivity,
    Tier,
    TruthCategory,
    entry_from_dict,
    entry_to_dict,
)
from memory.extensions import ExtensionNotFoundError, connect, load_extensions
from memory.feedback import FeedbackRecord
from memory.interactions import InteractionRecord
from memory.jobs import JOB_STATES, Job, NewJob, RetryPolicy, TrainingRequest
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
    "JOB_STATES",
    "MIGRATIONS",
    "BatchingEmbedder",
    "Clock",
    "Confidence",
    "DomainCount",
    "DuplicateContentError",
    "Embedder",
    "ExtensionNotFoundError",
    "FeedbackRecord",
    "HashEmbedder",
    "ImportFormatError",
    "ImportReport",
    "InteractionRecord",
    "Job",
    "Link",
    "MaintenanceReport",
    "MemoryEntry",
    "MemorySource",
    "MemoryStore",
    "MemoryType",
    "MigrationError",
    "MiniLMEmbedder",
    "NewJob",
    "ReadOnlyStoreError",
    "RememberResult",
    "RetrievalWeights",
    "RetryPolicy",
    "ScoreParts",
    "Sensitivity",
    "StoreClosedError",
    "SystemClock",
    "Tier",
    "TierPolicy",
    "TrainingRequest",
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
    "infer_domains",
    "load_extensions",
    "parse_relation",
]
