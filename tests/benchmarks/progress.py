"""Progress bars (rich) for the benchmarks' long loops.

They draw on stderr, so the figures printed on stdout stay clean for a pipe or a file, and they
disappear when their loop ends. Off a terminal (stderr to a file or a pipe) they are off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


def progress() -> Progress:
    """A transient bar on stderr: description, bar, done/total, elapsed, remaining."""
    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
                    redirect_stdout=False, redirect_stderr=False,  # figures printed meanwhile stay on stdout
                    disable=not console.is_terminal)  # a log file gets the figures, not bar frames


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """`items`, drawing a bar as they are consumed."""
    with progress() as bar:
        yield from bar.track(items, total=total, description=description)


@contextmanager
def counting(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A bar advanced by the callable it yields (`advance(n)`), for loops that are not a for."""
    with progress() as bar:
        task: TaskID = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
