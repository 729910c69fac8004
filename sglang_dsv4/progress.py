"""Progress of long operations (checkpoint conversion, weight loading, evals) as a tqdm bar on a
terminal, and nothing at all when the stream is not one (log files, pipes, CI): server logs and
test output stay free of bar redraws."""

import sys
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm import tqdm

__all__ = ["on_terminal", "progress", "track"]

T = TypeVar("T")


def on_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty is not None and isatty())
    except ValueError:  # a closed stream
        return False


def progress(total: int | None, desc: str, unit: str = "it", stream: TextIO | None = None) -> tqdm:
    """A bar on ``stream`` (default stderr), disabled unless it is a terminal."""
    stream = sys.stderr if stream is None else stream
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=stream,
        disable=not on_terminal(stream),
        mininterval=0.5,
        dynamic_ncols=True,
    )


def track(
    items: Iterable[T], desc: str, unit: str = "it", stream: TextIO | None = None
) -> Iterator[T]:
    """``items``, one by one, with a bar (total = ``len(items)`` when it has one)."""
    total = len(items) if hasattr(items, "__len__") else None
    with progress(total, desc, unit, stream) as bar:
        for item in items:
            yield item
            bar.update()
