"""One Rich console on stderr for logs, progress and summaries; stdout is for reports only."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


@dataclass
class CliState:
    """Process-wide CLI settings: verbosity (-1 quiet, 0 normal, 1+ verbose) and the console."""

    verbosity: int = 0
    console: Console = field(default_factory=lambda: Console(stderr=True, highlight=False))

    def info(self, message: str) -> None:
        if self.verbosity >= 0:
            self.console.print(message)

    def debug(self, message: str) -> None:
        if self.verbosity >= 1:
            self.console.print(f"[dim]{message}[/dim]")

    def warn(self, message: str) -> None:
        if self.verbosity >= 0:
            self.console.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)

    def error(self, message: str, hint: str | None = None) -> None:
        # One line (plus an optional hint line), never a traceback. Escaped: messages quote paths
        # and install lines such as "clip-audit[gpu]", which Rich would read as markup.
        self.console.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)
        if hint:
            self.console.print(f"[yellow]hint:[/yellow] {escape(hint)}", soft_wrap=True)

    def internal_error(self, exc: BaseException) -> None:
        self.error(
            f"internal error: {type(exc).__name__}: {exc}",
            "this is a bug in clip-audit; run with -vv for the traceback and report it",
        )
        if self.verbosity >= 2:
            self.console.print("".join(traceback.format_exception(exc)), markup=False)

    def _bar(self, transient: bool) -> Progress:
        """A Rich progress display on stderr, disabled when stderr is not a terminal or -q."""
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=transient,
            disable=not self.console.is_terminal or self.verbosity < 0,
        )

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Progress]:
        """One progress bar for one task."""
        with self._bar(transient=True) as bar:
            bar.add_task(description, total=total)
            yield bar

    @contextmanager
    def stage_progress(self) -> Iterator[Callable[[str, int, int | None], None]]:
        """A progress bar per stage: yields tick(stage, n done now, stage total)."""
        bar = self._bar(transient=False)
        tasks: dict[str, TaskID] = {}

        def tick(stage: str, n: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.advance(tasks[stage], n)

        with bar:
            yield tick


state = CliState()


def show_provider(runner: object) -> None:
    """Say what really runs the scoring; a provider ONNX Runtime fell back from is a warning."""
    provider = getattr(runner, "provider", "?")
    fallback = getattr(runner, "fallback_from", None)
    if fallback:
        state.warn(f"ONNX Runtime could not start {fallback}; scoring runs on {provider}")
    else:
        state.debug(f"scoring runs on {provider}")


def advance(bar: Progress, n: int) -> None:
    """Advance the (single) task of a progress bar by n."""
    bar.advance(bar.task_ids[0], n)
