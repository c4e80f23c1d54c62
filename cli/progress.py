"""Progress bars with rates (rich), shared by the commands that do long work."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} {self.unit}/s" if speed else f"-- {self.unit}/s", style="cyan")


def _progress(console: Console, unit: str) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    RateColumn(unit), TimeElapsedColumn(), TimeRemainingColumn(), console=console)


@contextmanager
def extraction_progress(console: Console) -> Iterator[tuple[Callable[[int, int], None], Callable[[int], None]]]:
    with _progress(console, "img") as bar:
        task = bar.add_task("extract", total=None)

        def on_start(todo: int, total: int) -> None:
            bar.update(task, total=todo, description=f"extract ({total - todo} of {total} already stored)"
                       if todo < total else "extract")

        yield on_start, lambda n: bar.advance(task, n)


@contextmanager
def probe_progress(console: Console, name: str) -> Iterator[Callable[[int, int], None]]:
    with _progress(console, "head") as bar:
        task = bar.add_task(name, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@contextmanager
def recode_progress(console: Console) -> Iterator[Callable[[int, int], None]]:
    with _progress(console, "part") as bar:
        task = bar.add_task("recode", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
