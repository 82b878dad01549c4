"""`wsseg review` (a page to look at a run's masks) and `wsseg masks export|import` (a run's masks to
annotation tools, corrected masks back)."""

from __future__ import annotations

import argparse
from pathlib import Path

FORMAT_HELP = ("coco (COCO instance JSON, RLE), cvat (COCO 1.0, as CVAT imports it), labelstudio (tasks "
               "with brush pre-annotations), png (a folder of <stem>.png)")


def add_parser(subparsers) -> None:
    from wsseg.annotations import list_formats

    review = subparsers.add_parser("review", help="write one HTML page of a run's masks, least confident first",
                                   description="Every image of the run's evaluation set with each producer's mask "
                                               "outlined, its map and the ground truth when there is one, sorted by "
                                               "confidence (least confident first), with per-image Dice; filters by "
                                               "producer and confidence, keyboard navigation. Self-contained: "
                                               "opens from disk.")
    review.add_argument("run_dir", type=Path, help="a finished run directory")
    review.add_argument("--producer", nargs="*", metavar="NAME", help="only these producers (default: every one "
                        "whose masks have a confidence)")
    review.add_argument("--out", type=Path, help="the HTML file (default RUN_DIR/review.html)")
    review.add_argument("--data-root", type=Path, help="data root of the run's images")
    review.set_defaults(func=cmd_review)

    masks = subparsers.add_parser("masks", help="export a run's masks to annotation tools; import corrections",
                                  description="Move masks between wsseg and annotation tools (CVAT, Label Studio, "
                                              "anything that reads COCO). Formats: " + FORMAT_HELP + ".")
    verbs = masks.add_subparsers(dest="verb", required=True, metavar="VERB")
    export = verbs.add_parser("export", help="write one producer's masks of a run in a tool's format")
    export.add_argument("run_dir", type=Path, help="a run directory (its masks/<producer>/ folder)")
    export.add_argument("--format", required=True, choices=list_formats(), help=FORMAT_HELP)
    export.add_argument("--producer", default="unet", help="which masks (a folder name under masks/; default unet)")
    export.add_argument("--label", default="object", help="the class name the tool shows (default object)")
    export.add_argument("--out", required=True, type=Path, help="the file (coco, cvat, labelstudio: .json) or "
                        "folder (png) to write")
    export.add_argument("--data-root", type=Path, help="data root of the run, to name masks by their image files")
    export.add_argument("--least-confident", type=int, metavar="N", help="only the N masks the run was least sure "
                        "of (per_image.csv's confidence), least confident first: the ones to correct first")
    export.set_defaults(func=cmd_export)
    imported = verbs.add_parser("import", help="read corrected masks into a folder of <stem>.png masks")
    imported.add_argument("path", type=Path, help="the exported (and corrected) file, or a PNG folder")
    imported.add_argument("--format", required=True, choices=list_formats(), help=FORMAT_HELP)
    imported.add_argument("--out", required=True, type=Path, help="folder for the <stem>.png masks (0/255)")
    imported.set_defaults(func=cmd_import)


def cmd_export(args: argparse.Namespace) -> int:
    from wsseg.annotations import run_mask_items, write_masks
    from wsseg.cli.ui import console

    items = run_mask_items(args.run_dir, args.producer, args.data_root, args.least_confident)
    out = write_masks(items, args.format, args.out, args.label)
    console.print(f"[green]wrote[/green] {len(items)} masks of {args.producer} as {args.format} to {out}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from wsseg.annotations import MaskItem, read_masks, write_masks
    from wsseg.cli.ui import console

    masks = read_masks(args.path, args.format)
    out = write_masks([MaskItem(stem, f"{stem}.png", mask) for stem, mask in masks.items()], "png", args.out)
    console.print(f"[green]wrote[/green] {len(masks)} masks to {out}")
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    from wsseg.cli.ui import console, rich_progress
    from wsseg.review import write_review_page

    with rich_progress() as progress:
        out = write_review_page(args.run_dir, args.out, args.producer, args.data_root, progress)
    console.print(f"[green]wrote[/green] {out}")
    return 0
