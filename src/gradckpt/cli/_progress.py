"""A progress bar on stderr for long commands, shown only on a terminal and never with ``--json``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["progress_bar"]


@contextmanager
def progress_bar(
    label: str, total: int | None, *, enabled: bool = True, file: Any = None
) -> Iterator[Callable[[str], None]]:
    """Yield ``step(description)``, which advances the bar by one and relabels it.

    Silent (``step`` does nothing) when ``enabled`` is False (``--json``) or stderr is not a
    terminal (a pipe, a file, CI logs), so machine-read output and logs stay clean. ``total``
    None shows a count without an end (searches whose length is not known in advance).
    The bar is transient: it is gone once the command prints its result.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = Console(stderr=True, file=file)
    if not enabled or not console.is_terminal:
        yield lambda _description: None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)

        def step(description: str) -> None:
            bar.update(task, advance=1, description=description)

        yield step
