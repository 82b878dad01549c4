"""`wsseg compare`: finished runs side by side (seeds, draws of the labelled images, recipes)."""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="finished runs side by side: each producer's mean and range over them",
        description="Reads each run's metrics.json and config.yaml and prints every producer's score per run "
                    "with its mean and range (best mean first), then each run's seed, what its select stage "
                    "chose, its rounds and wall time. One run is one draw: run a recipe with seed=0, 1, 2 to see "
                    "how much of a difference between settings is the seed's.",
        epilog="Example: wsseg compare runs/pets_auto/s0 runs/pets_auto/s1 runs/pets_auto/s2 --out runs/pets_auto")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="finished run directories")
    parser.add_argument("--metric", default="dice", help="which score of metrics.json (dice, iou, precision, "
                        "recall, accuracy, pooled_dice; default dice)")
    parser.add_argument("--out", type=Path, help="also write compare.md and compare.csv into this folder")
    parser.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from rich.table import Table

    from wsseg.cli.ui import console
    from wsseg.compare import compare_runs, read_run, write_comparison

    runs = [read_run(path) for path in args.run_dirs]
    rows = compare_runs(runs, args.metric)
    table = Table(title=f"{args.metric} over {len(runs)} runs (best mean first)")
    for column in ["producer", "mean", "range"] + [run.label for run in runs]:
        table.add_column(column, justify="left" if column == "producer" else "right", no_wrap=column == "producer")
    for row in rows:
        table.add_row(row.producer, f"{row.mean:.4f}", f"{row.low:.4f}-{row.high:.4f}",
                      *[f"{v:.4f}" if v is not None else "-" for v in row.values])
    console.print(table)
    facts = Table(title="the runs")
    for column in ("run", "recipe", "seed", "select chose", "rounds", "wall time (min)"):
        facts.add_column(column, justify="right" if column in ("seed", "rounds", "wall time (min)") else "left")
    for run in runs:
        facts.add_row(str(run.root), run.recipe, "" if run.seed is None else str(run.seed), run.select_choice or "",
                      "" if run.self_training_rounds is None else str(run.self_training_rounds), run.wall_minutes)
    console.print(facts)
    if args.out:
        files = write_comparison(runs, rows, args.out, args.metric)
        console.print(f"written: {files['markdown']}, {files['csv']}")
    return 0
