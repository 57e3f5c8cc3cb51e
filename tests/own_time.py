"""memlane's own time for one chat request, read from its ``memlane_overhead_seconds`` metric
(each request's total minus its wait on the upstream).

Tests that bound how long memlane takes (a memory budget, a fallback that must add no wait)
use it instead of the client's clock: on a busy two-core machine the in-process fake upstream
alone was seen to take 1.4 s to answer, which says nothing about memlane.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

T = TypeVar("T")


def overhead(url: str) -> tuple[float, float]:
    """(count, sum) of ``memlane_overhead_seconds`` so far, over all labels."""
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text)
    samples = [s for f in families if f.name == "memlane_overhead_seconds" for s in f.samples]
    return (sum(s.value for s in samples if s.name.endswith("_count")),
            sum(s.value for s in samples if s.name.endswith("_sum")))


def with_own_time(url: str, send: Callable[[], T], *, wait_s: float = 10.0) -> tuple[T, float]:
    """`send()`'s result (one chat request, nothing else in flight) and memlane's own seconds for it."""
    count, total = overhead(url)
    result = send()
    deadline = time.monotonic() + wait_s
    while (now := overhead(url))[0] < count + 1:  # observed as the request finishes
        assert time.monotonic() < deadline, "the request's overhead was never observed"
        time.sleep(0.01)
    return result, now[1] - total
