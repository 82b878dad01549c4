"""The `wsseg` command."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from wsseg import __version__
from wsseg.cli import compare, recipe
from wsseg.errors import WssegError


def cmd_list(args) -> int:
    from wsseg.cams import list_map_methods, map_method_options
    from wsseg.cli.ui import console
    from wsseg.config import list_recipes
    from wsseg.data import list_datasets
    from wsseg.models.weights import list_weight_sources
    from wsseg.refine import list_refinements
    from wsseg.stages.references import list_reference_producers

    def maps():  # with the options each takes from maps.method_options
        return [f"{m} ({', '.join(map_method_options(m))})" if map_method_options(m) else m
                for m in list_map_methods()]

    kinds = {"datasets": list_datasets, "maps": maps,
             "weights": list_weight_sources, "references": list_reference_producers,
             "refinements": list_refinements, "recipes": list_recipes}
    for kind in [args.kind] if args.kind else kinds:
        console.print(f"[bold]{kind}[/bold]: {', '.join(kinds[kind]())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsseg",
        description="wsseg turns image-level labels into pixel masks: a classifier, activation maps "
                    "(CCAM, Grad-CAM, ...), pseudo-masks, a U-Net trained on them, ONNX export.",
        epilog="Start with `wsseg recipe run demo`, which needs no data.")
    parser.add_argument("--version", action="version", version=f"wsseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every stage to the console")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    recipe.add_parser(subparsers)
    lister = subparsers.add_parser("list", help="list registered datasets, map methods, weight sources, recipes")
    lister.add_argument("kind", nargs="?", choices=["datasets", "maps", "weights", "references", "refinements",
                                                    "recipes"])
    lister.set_defaults(func=cmd_list)
    compare.add_parser(subparsers)
    for module in _optional_commands():
        module.add_parser(subparsers)
    return parser


def _optional_commands():
    """Commands of the deployment layer (export, predict), the benchmarks and masks (export, import)."""
    from wsseg.cli import bench, deploy, masks

    return [deploy, bench, masks]


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (`run demo --out x a.b=1`): collect the stragglers.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except WssegError as exc:
        print(f"wsseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wsseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
