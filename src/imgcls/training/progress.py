"""A live progress bar for one epoch: loss, accuracy and images per second.

Shown only on a terminal; in a log or CI the per-epoch summary line suffices.
"""

from __future__ import annotations


class EpochProgress:
    """Context manager wrapping a transient rich progress bar."""

    def __init__(self, console, total_steps: int, epoch: int, epochs: int):
        self.enabled = console is not None and console.is_terminal
        self.total = total_steps
        self.label = f"epoch {epoch}/{epochs}"
        self._progress = None
        if self.enabled:
            # Imported here: rich.progress takes 20-100 ms to import, wasted on a run with no terminal.
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), console=console, transient=True,
            )
            self._task = self._progress.add_task(self.label, total=total_steps, stats="")

    def __enter__(self) -> "EpochProgress":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, step: int, loss: float, accuracy: float, images_per_sec: float) -> None:
        if self._progress is not None:
            stats = f"loss {loss:.4f}  acc {accuracy:.4f}  {images_per_sec:,.0f} img/s"
            self._progress.update(self._task, completed=step, stats=stats)
