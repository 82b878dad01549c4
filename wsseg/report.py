"""Run reports as files: Markdown table and bar chart. Terminal rendering lives in the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from wsseg.metrics import METRIC_NAMES

TABLE_COLUMNS = ("dice", "iou", "precision", "recall", "accuracy", "pooled_dice", "n_images")


def producer_rows(metrics: Dict[str, Dict]) -> List[tuple]:
    """(name, summary) for every mask producer in a metrics.json mapping, best Dice first."""
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, dict) and "dice" in v]
    return sorted(rows, key=lambda kv: -kv[1]["dice"])


def markdown_report(name: str, metrics: Dict[str, Dict], timings: Dict[str, float]) -> str:
    lines = [f"# {name}", "", "| producer | " + " | ".join(TABLE_COLUMNS) + " |",
             "|---|" + "---:|" * len(TABLE_COLUMNS)]
    for producer, summary in producer_rows(metrics):
        cells = [f"{summary[c]:.4f}" if isinstance(summary.get(c), float) else str(summary.get(c, ""))
                 for c in TABLE_COLUMNS]
        lines.append(f"| {producer} | " + " | ".join(cells) + " |")
    if "classifier" in metrics:
        lines += ["", "Classifier: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in metrics["classifier"].items())]
    lines += select_lines(metrics.get("select"))
    lines += ["", "| stage | wall time (s) |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in timings.items()]
    return "\n".join(lines) + "\n"


def select_lines(select, top: int = 15) -> List[str]:
    """The select stage's choice and its best candidates (all of them are in select.json)."""
    if not select:
        return []
    if not select.get("candidates"):
        return ["", f"Select: {select.get('note', 'nothing chosen')}; producer {select['choice']['candidate']}."]
    lines = ["", f"## Select ({select['labelled_images']} labelled images, {len(select['candidates'])} candidates)", "",
             "| candidate | dice | leave-one-out | ms / image |", "|---|---:|---:|---:|"]
    lines += [f"| {r['candidate']} | {r['dice']:.4f} | {r['loo_low']:.3f}-{r['loo_high']:.3f} | {cost_ms(r)} |"
              for r in select["candidates"][:top]]
    if select["choice"]["candidate"] != select["candidates"][0]["candidate"]:
        lines.append(f"\nChosen (`select.prefer_faster_within`: the fastest close to the best): "
                     f"{select['choice']['candidate']}, Dice {select['choice']['dice']:.4f}, {cost_ms(select['choice'])} ms "
                     f"an image")
    if select.get("choice_unseen_estimate") is not None:
        lines.append(f"\nThe choice scored on images it was not chosen on (nested leave-one-out): "
                     f"{select['choice_unseen_estimate']:.4f} (the winner's {select['choice']['dice']:.4f} is optimistic: "
                     f"it is the best of {len(select['candidates'])} on the same images)")
    for step in select.get("rounds", [])[1:]:
        if "unet" in step:  # rounds_by: unet | refinement
            verdict = "the best so far" if step["gained"] else "below an earlier round's"
            verdict += "; another round" if step.get("another_round", step["gained"]) else "; no more rounds"
            labels = (f"; its refined predictions (the next round's labels) {step['labels_dice']:.4f}"
                      if "labels_dice" in step else "")
            lines.append(f"\n{step['unet']}'s U-Net: Dice {step['dice']:.4f} on the held-out labelled images"
                         f"{labels} ({verdict})")
            continue
        unet = f"; the U-Net's own masks {step['unet_dice']:.4f}" if "unet_dice" in step else ""
        lines.append(f"\n{step['labels']}'s labels: Dice {step['dice']:.4f} on the labelled images{unet}"
                     f" ({'gained: another round' if step['gained'] else 'no gain: the last round'})")
    return lines


def cost_ms(row: Dict) -> str:
    """A candidate's maps and refinement per image, in milliseconds ("" where not measured)."""
    seconds = row.get("seconds_per_image")
    return "" if seconds is None else f"{1000 * seconds:.0f}"


def bar_chart(path: Path, metrics: Dict[str, Dict], title: str, columns=("dice", "iou", "precision", "recall")) -> Path:
    """Grouped bars, one group per producer: the picture of the methods table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = producer_rows(metrics)
    x = np.arange(len(rows))
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) + 2), 4))
    for k, column in enumerate(columns):
        ax.bar(x + k * width - 0.4 + width / 2, [r[1][column] for r in rows], width, label=column)
    ax.set_xticks(x, [r[0] for r in rows], rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean per image")
    ax.set_title(title)
    ax.legend(ncol=len(columns), fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


assert set(METRIC_NAMES) <= set(TABLE_COLUMNS)
