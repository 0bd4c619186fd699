"""One place for terminal output and logging: rich progress bars on stderr, silenced by
``--quiet``, and the run log (``RUN/log.txt``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from medtl.files import escape_undecodable

console = Console(stderr=True)
log = logging.getLogger("medtl")


def printable(text: str, keep: str = "") -> str:
    """``text`` as it may be shown on a terminal: every character that is not printable (control
    characters such as ESC that could steer the terminal, bidirectional overrides, the bytes of
    a file name that are not UTF-8) written as a backslash escape, except those in ``keep``.
    A non-UTF-8 byte is shown ``\\xNN``, as in the files medtl writes (escape_undecodable)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else
                   escape_undecodable(c) if "\ud800" <= c <= "\udfff" else repr(c)[1:-1]
                   for c in text)


class _PrintableFormatter(logging.Formatter):
    """Log lines for the terminal: control characters escaped (newlines and tabs kept)."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), keep="\n\t")


class _Bar:
    """``advance(n)``, and ``update(completed=, total=, description=)`` to move the bar to new
    figures (auto's overall bar, whose total is an estimate revised as the climb goes)."""

    def __init__(self, progress: Progress | None = None, task=None) -> None:
        self.progress, self.task = progress, task

    def __call__(self, n: float = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def update(self, **fields) -> None:
        if self.progress is not None:
            self.progress.update(self.task, **fields)


@contextmanager
def progress_bar(description: str, total: int, *, quiet: bool = False,
                 percent: bool = False) -> Iterator:
    """Yield ``advance(n)`` (a ``_Bar``); draws a bar unless quiet (and rich hides it when not a
    terminal). ``percent``: show the share done instead of ``done/total`` (a total that is
    not a count, such as estimated seconds)."""
    if quiet or total <= 0:
        yield _Bar()
        return
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(),
        TaskProgressColumn() if percent else MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield _Bar(progress, task)


class _RewritingFormatter(logging.Formatter):
    """A formatter whose lines go through ``rewrite`` (the run's ``--paths`` form of the paths
    they name); the record itself is left alone, so the terminal still shows what happened."""

    def __init__(self, fmt: str, rewrite: Callable[[str], str] | None) -> None:
        super().__init__(fmt)
        self.rewrite = rewrite

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        # The log file is UTF-8: a file name that is not is written as in every other file.
        return escape_undecodable(self.rewrite(line) if self.rewrite is not None else line)


@contextmanager
def run_logging(out: Path, quiet: bool, append: bool = False,
                rewrite: Callable[[str], str] | None = None) -> Iterator[None]:
    """Everything logged under ``medtl`` goes to RUN/log.txt, and to the terminal unless quiet.

    ``rewrite`` maps each line written to the log file (medtl.data.privacy.PathDisplay.scrub:
    paths of the data relative or hashed, as ``--paths`` asks)."""
    from rich.logging import RichHandler

    out.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(out / "log.txt", mode="a" if append else "w",
                                       encoding="utf-8")
    file_handler.setFormatter(_RewritingFormatter("%(asctime)s %(levelname)s %(message)s",
                                                  rewrite))
    handlers: list[logging.Handler] = [file_handler]
    if not quiet:
        term = RichHandler(console=console, show_path=False, show_time=False)
        term.setFormatter(_PrintableFormatter())
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
