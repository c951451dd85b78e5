"""Console output shared by every command: repeated data warnings summarised, and progress that writes plain
lines when the output is not a terminal (log files, CI) instead of redrawing a bar."""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def summarize_warnings(messages: Sequence[str], verbose: bool = False) -> list[str]:
    """One line per kind of problem: messages "PATH: problem" that share the problem become one line with the
    count and the first path (every message when `verbose`)."""
    if verbose:
        return list(messages)
    groups: dict[str, list[str]] = {}
    for message in messages:
        path, sep, problem = message.partition(": ")
        key = problem if sep else message
        groups.setdefault(key, []).append(path if sep else "")
    lines = []
    for problem, paths in groups.items():
        if len(paths) == 1:
            lines.append(f"{paths[0]}: {problem}" if paths[0] else problem)
        else:
            lines.append(f"{len(paths)} files: {problem} (first: {paths[0]}; --verbose lists them all)")
    return lines


class PlainProgress:
    """The subset of rich.progress.Progress that facemark uses, writing a line per task at most every
    `interval` seconds and when a task completes: readable in a log file, unlike a redrawn bar."""

    def __init__(self, console: Console, interval: float = 30.0) -> None:
        self.console = console
        self.interval = interval
        self._tasks: dict[int, dict] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **_fields) -> int:
        task_id = len(self._tasks)
        self._tasks[task_id] = {"description": description, "total": total, "completed": 0.0,
                                "start": time.monotonic(), "printed": time.monotonic()}
        return task_id

    def remove_task(self, task_id: int) -> None:
        self._tasks.pop(task_id, None)

    def advance(self, task_id: int, advance: float = 1.0) -> None:
        task = self._tasks[task_id]
        self.update(task_id, completed=task["completed"] + advance)

    def update(self, task_id: int, completed: float | None = None, total: float | None = None, info: str = "",
               **_fields) -> None:
        task = self._tasks.get(task_id)
        if task is None:
            return
        if total is not None:
            task["total"] = total
        if completed is not None:
            task["completed"] = completed
        now = time.monotonic()
        done = task["total"] is not None and task["completed"] >= task["total"]
        if done or now - task["printed"] >= self.interval:
            task["printed"] = now
            total_text = "" if task["total"] is None else f"/{task['total']:.0f}"
            self.console.print(f"{task['description']}: {task['completed']:.0f}{total_text} "
                               f"({now - task['start']:.0f}s){'  ' + info if info else ''}", highlight=False)


def progress_display(console: Console, *columns, transient: bool = True, disable: bool = False
                     ) -> Progress | PlainProgress:
    """A rich progress bar on a terminal, plain lines otherwise (`columns` default to description, bar, N/M,
    time left)."""
    if not console.is_terminal:
        return PlainProgress(console) if not disable else _Silent(console)
    columns = columns or (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, console=console, transient=transient, disable=disable)


class _Silent(PlainProgress):
    """No progress lines; `.console` still prints (the error lines a run reports through it)."""

    def update(self, task_id: int, completed: float | None = None, total: float | None = None, info: str = "",
               **_fields) -> None:
        return None

