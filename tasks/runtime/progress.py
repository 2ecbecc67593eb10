"""A terminal progress bar for per-step output (MLflow gets the numbers; the Prefect log stays readable)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def progress_bar(stage: str, total: int, start: int = 0):
    """Yields update(step, **fields); disabled with PALM_RLHF_PROGRESS=0."""
    enabled = os.environ.get("PALM_RLHF_PROGRESS", "1") != "0"
    console = Console(file=sys.stderr)
    bar = Progress(TextColumn(f"[bold]{stage}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console, disable=not enabled,
                   transient=False)
    task = bar.add_task(stage, total=total, completed=start, info="")

    def update(step: int, **fields: float) -> None:
        info = "  ".join(f"{k} {v:.4g}" for k, v in fields.items())
        bar.update(task, completed=step, info=info)

    with bar:
        yield update
