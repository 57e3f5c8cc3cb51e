from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from memory import HashEmbedder, MemoryStore


class StepClock:
    """Naive-UTC clock that moves one second per reading, so ordering is exact."""

    def __init__(self, start: datetime = datetime(2025, 1, 1, 12, 0, 0)) -> None:
        self._next = start

    def now(self) -> datetime:
        now, self._next = self._next, self._next + timedelta(seconds=1)
        return now


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "memlane.duckdb"


@pytest.fixture
def clock() -> StepClock:
    return StepClock()


@pytest.fixture
def store(db_path: Path, clock: StepClock) -> Iterator[MemoryStore]:
    with MemoryStore.open(db_path, embedder=HashEmbedder(), clock=clock) as opened:
        yield opened
