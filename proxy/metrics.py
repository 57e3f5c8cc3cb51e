"""Prometheus metrics, on a registry owned by one app (tests build many apps)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.5, 1)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, CPU seconds, open files
        self.requests = Counter(
            "memlane_requests", "HTTP requests served", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "memlane_request_seconds", "Time from request to last response byte", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.overhead = Histogram(
            "memlane_overhead_seconds",
            "Time the proxy itself adds to a chat request (total minus time waiting on the upstream)",
            ["provider", "memory"], buckets=_OVERHEAD_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "memlane_time_to_first_token_seconds", "Time from request to the first streamed content byte",
            ["provider"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.upstream_errors = Counter(
            "memlane_upstream_errors", "Upstream calls that failed", ["provider", "code"], registry=r
        )
        self.memories_injected = Histogram(
            "memlane_memories_injected", "Memories injected per chat request",
            buckets=(0, 1, 2, 3, 5, 8, 13, 21), registry=r,
        )
        self.memory_failures = Counter(
            "memlane_memory_failures",
            "Chat requests whose memory retrieval failed or timed out (answered without memory, or preloaded)",
            registry=r,
        )
        self.memory_preloaded = Counter(
            "memlane_memory_preloaded",
            "Chat requests given the learner's preloaded context: fallback (retrieval failed or was late) "
            "or served (memory_preload=serve, no search)", ["reason"], registry=r,
        )
        self.log_queue_depth = Gauge(
            "memlane_log_queue_depth", "Interactions waiting to be written to the teacher log", registry=r
        )
        self.log_rows_dropped = Counter(
            "memlane_log_rows_dropped", "Teacher-log rows dropped because the queue was full", registry=r
        )
        self.log_rows_written = Counter(
            "memlane_log_rows_written", "Teacher-log rows written", registry=r
        )
        self.memories_extracted = Counter(
            "memlane_memories_extracted", "Memories created by the extractor", registry=r
        )
        self.plm_updates_started = Counter(
            "memlane_plm_updates_started", "Personal-adapter updates the server started", registry=r
        )
        self.plm_updates = Counter(
            "memlane_plm_updates",
            "Personal-adapter updates by outcome: accepted, rejected (by the gate), failed, empty, cancelled",
            ["outcome"], registry=r,
        )
        self.plm_update_seconds = Histogram(
            "memlane_plm_update_seconds", "Wall time of a personal-adapter update: data, training and gate",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600), registry=r,
        )
        self.store_memory = Gauge(
            "memlane_store_memory_bytes",
            "Memory DuckDB's buffer manager holds for the store, by what holds it (base_table: cached "
            "table blocks, art_index: key indexes, in_memory_table: rows not yet checkpointed, ...)",
            ["tag"], registry=r,
        )
        self.learner_jobs = Counter(
            "memlane_learner_jobs", "Learner job attempts by outcome: done, pending (to retry), dead, lost",
            ["outcome"], registry=r,
        )
