"""What the handlers reach through ``request.app.state.memlane``: built once per app."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from adapters import LocalModel
from memory import Embedder, MemoryStore
from proxy.auth import KeyRing
from proxy.metrics import Metrics
from proxy.recall import Recaller
from proxy.settings import Settings
from proxy.shutdown import Draining
from proxy.upstream import ChatUpstream


class InteractionSink(Protocol):
    def submit(self, exchange: Any) -> bool: ...


class DroppingSink:
    """Stands in for the learner when the store could not be opened: rows are counted as dropped."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def submit(self, exchange: Any) -> bool:
        self.metrics.log_rows_dropped.inc()
        return False


@dataclass
class AppState:
    settings: Settings
    keyring: KeyRing
    metrics: Metrics
    upstreams: dict[str, ChatUpstream]
    recaller: Recaller
    learner: InteractionSink
    store: MemoryStore | None
    embedder: Embedder | None
    local_model: LocalModel | None
    http_client: Any = None  # the pooled httpx.AsyncClient of the byte-passthrough endpoints
    background: list[Any] = field(default_factory=list)
    draining: Draining = field(default_factory=lambda: Draining(30.0))  # ends open streams on SIGTERM
