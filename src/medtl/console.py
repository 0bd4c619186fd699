"""One place for terminal output and logging: rich progress bars on stderr, silenced by
``--quiet``, and the run log (``RUN/log.txt``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
log = logging.getLogger("medtl")


@contextmanager
def progress_bar(description: str, total: int, *, quiet: bool = False) -> Iterator:
    """Yield ``advance(n)``; draws a bar unless quiet (and rich hides it when not a terminal)."""
    if quiet or total <= 0:
        yield lambda n=1: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


@contextmanager
def run_logging(out: Path, quiet: bool, append: bool = False) -> Iterator[None]:
    """Everything logged under ``medtl`` goes to RUN/log.txt, and to the terminal unless quiet."""
    from rich.logging import RichHandler

    out.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(out / "log.txt", mode="a" if append else "w",
                                       encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handlers: list[logging.Handler] = [file_handler]
    if not quiet:
        term = RichHandler(console=console, show_path=False, show_time=False)
        term.setLevel(logging.INFO)
        handlers.append(term)
    old_level = log.level
    log.setLevel(logging.INFO)
    for h in handlers:
        log.addHandler(h)
    try:
        yield
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
        log.setLevel(old_level)
