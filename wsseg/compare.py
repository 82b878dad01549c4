"""Finished runs side by side: one recipe over several seeds (or draws of its labelled images), or several
recipes on one dataset. Each producer's score in every run with its mean and range, what the select stage
chose, and the wall times: the numbers a one-run table hides. Files only; the CLI prints the table."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Dict, List, Optional, Sequence

import yaml

from wsseg.errors import DataError
from wsseg.report import producer_rows


@dataclass
class FinishedRun:
    """What a finished run recorded: its metrics.json (wall times apart) and its recipe's name and seed."""

    root: Path
    recipe: str
    seed: Optional[int]
    metrics: Dict
    timings: Dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.root.name} (seed {self.seed})" if self.seed is not None else self.root.name

    @property
    def select_choice(self) -> Optional[str]:
        choice = (self.metrics.get("select") or {}).get("choice") or {}
        return choice.get("candidate")

    @property
    def wall_minutes(self) -> str:
        """This run's wall time; runs recorded before `wall_s` existed: the sum of their stage timings (~)."""
        if "wall_s" in self.metrics:
            return f"{self.metrics['wall_s'] / 60:.1f}"
        return f"~{sum(self.timings.values()) / 60:.1f}" if self.timings else ""

    @property
    def self_training_rounds(self) -> Optional[int]:
        return (self.metrics.get("select") or {}).get("self_training_rounds")


def read_run(run_dir: Path) -> FinishedRun:
    """A run directory's records; the error names the file at fault and how to finish the run."""
    run_dir = Path(run_dir)
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        raise DataError(f"{metrics_file} does not exist: not a finished run (an interrupted one continues with "
                        f"`wsseg recipe run --resume {run_dir}`)")
    try:
        metrics = json.loads(metrics_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{metrics_file}: not valid JSON ({exc})") from None
    config = {}
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        try:
            config = yaml.safe_load(config_file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise DataError(f"{config_file}: not valid YAML ({exc})") from None
    timings = metrics.pop("timings_s", {}) or {}
    return FinishedRun(run_dir, str(config.get("name", run_dir.name)), config.get("seed"), metrics,
                       {k: float(v) for k, v in timings.items()})


@dataclass
class ProducerSpread:
    """One producer's score in each run (None where a run has no such producer)."""

    producer: str
    values: List[Optional[float]]

    @property
    def present(self) -> List[float]:
        return [v for v in self.values if v is not None]

    @property
    def mean(self) -> float:
        return mean(self.present)

    @property
    def low(self) -> float:
        return min(self.present)

    @property
    def high(self) -> float:
        return max(self.present)


def compare_runs(runs: Sequence[FinishedRun], metric: str = "dice") -> List[ProducerSpread]:
    """Every producer any run scored, best mean first."""
    names: List[str] = []
    for run in runs:
        names += [name for name, summary in producer_rows(run.metrics) if name not in names and metric in summary]
    if not names:
        raise DataError(f"none of {', '.join(str(r.root) for r in runs)} scored a producer's {metric!r} "
                        "(their evaluation images have no masks?)")
    rows = []
    for name in names:
        values = [run.metrics.get(name, {}).get(metric) for run in runs]
        rows.append(ProducerSpread(name, [None if v is None else float(v) for v in values]))
    return sorted(rows, key=lambda row: -row.mean)


def markdown_comparison(runs: Sequence[FinishedRun], rows: Sequence[ProducerSpread], metric: str = "dice") -> str:
    header = ["producer", f"mean {metric}", "range"] + [run.label for run in runs]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = [f"{v:.4f}" if v is not None else "" for v in row.values]
        lines.append(f"| {row.producer} | {row.mean:.4f} | {row.low:.4f}-{row.high:.4f} | " + " | ".join(cells) + " |")
    lines += ["", "| run | recipe | seed | select chose | rounds | select (s) | wall time (min) |",
              "|---|---|---:|---|---:|---:|---:|"]
    for run in runs:
        select_s = run.timings.get("select")
        lines.append(f"| {run.root.name} | {run.recipe} | {'' if run.seed is None else run.seed} | "
                     f"{run.select_choice or ''} | {'' if run.self_training_rounds is None else run.self_training_rounds}"
                     f" | {'' if select_s is None else f'{select_s:.0f}'} | {run.wall_minutes} |")
    return "\n".join(lines) + "\n"


def write_comparison(runs: Sequence[FinishedRun], rows: Sequence[ProducerSpread], out_dir: Path,
                     metric: str = "dice") -> Dict[str, Path]:
    """compare.md (the tables) and compare.csv (one line per producer and run) in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = out_dir / "compare.md"
    markdown.write_text(markdown_comparison(runs, rows, metric))
    table = out_dir / "compare.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["producer", "run", "recipe", "seed", metric])
        for row in rows:
            for run, value in zip(runs, row.values):
                if value is not None:
                    writer.writerow([row.producer, str(run.root), run.recipe, run.seed, f"{value:.6f}"])
    return {"markdown": markdown, "csv": table}
