"""Rich presentation: progress bars and the benchmark table. Only the CLI imports this."""

from __future__ import annotations

import contextlib
import logging
from typing import Dict, Iterable, Optional

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from wsseg.report import TABLE_COLUMNS, cost_ms, producer_rows

console = Console(stderr=False)
if not console.is_terminal:  # logs and CI: wide enough that the table never truncates
    console.width = max(console.width, 132)
COLUMN_LABELS = {"precision": "prec", "accuracy": "acc", "pooled_dice": "pooled dice", "n_images": "n"}


@contextlib.contextmanager
def rich_progress():
    """Yield a progress callback for the stages that draws one rich bar per loop."""
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)

    def track(iterable: Iterable, total: Optional[int] = None, description: str = ""):
        task = progress.add_task(description, total=total)
        for item in iterable:
            yield item
            progress.advance(task)

    with progress:
        yield track


def setup_console_logging(verbose: bool = False) -> None:
    log = logging.getLogger("wsseg")
    if not any(isinstance(h, RichHandler) for h in log.handlers):
        log.addHandler(RichHandler(console=console, show_path=False, level=logging.DEBUG if verbose else logging.WARNING))
    log.setLevel(logging.INFO)


def metrics_table(title: str, metrics: Dict[str, Dict], timings: Dict[str, float]) -> Table:
    table = Table(title=title, show_lines=False)
    table.add_column("producer", style="bold", no_wrap=True)
    for column in TABLE_COLUMNS:
        table.add_column(COLUMN_LABELS.get(column, column), justify="right", no_wrap=True)
    for name, summary in producer_rows(metrics):
        cells = [f"{summary[c]:.4f}" if isinstance(summary.get(c), float) else str(summary.get(c, ""))
                 for c in TABLE_COLUMNS]
        table.add_row(name, *cells)
    if timings:
        table.caption = "wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
    return table


def print_run_summary(name: str, metrics: Dict[str, Dict], timings: Dict[str, float]) -> None:
    console.print(metrics_table(f"{name}: masks vs ground truth", metrics, timings))
    select = metrics.get("select") or {}
    if select.get("candidates"):
        table = Table(title=f"select: best of {len(select['candidates'])} candidates on "
                            f"{select['labelled_images']} labelled images (all in select.json)")
        for column in ("candidate", "dice", "leave-one-out", "ms / image"):
            table.add_column(column, justify="left" if column == "candidate" else "right")
        for row in select["candidates"][:10]:
            table.add_row(row["candidate"], f"{row['dice']:.4f}", f"{row['loo_low']:.3f}-{row['loo_high']:.3f}",
                          cost_ms(row))
        if select["choice"]["candidate"] != select["candidates"][0]["candidate"]:
            table.caption = f"chosen, the fastest close to the best: {select['choice']['candidate']}"
        console.print(table)
    elif select:
        console.print(f"[bold]select[/bold]: {select.get('note')}")
    if "classifier" in metrics:
        items = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics["classifier"].items())
        console.print(f"[bold]classifier[/bold]: {items}")
