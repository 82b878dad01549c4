"""`wsseg bench KIND`: speed (inference, maps, U-Net training steps), backend agreement, map quality on labelled
images, how reliably a few labelled images choose the producer, and the hand-labelling the review loop saves."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from wsseg.pipeline.layout import RunLayout


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="speed benchmarks")
    kinds = bench.add_subparsers(dest="bench", required=True, metavar="KIND")
    infer = kinds.add_parser("infer", help="PyTorch eager vs ONNX Runtime images/s at batch 1 and 8",
                             description="Times the U-Net of a run (or a fresh one with --encoder) in PyTorch "
                                         "eager and ONNX Runtime (fp32 and, if present, INT8) on the same inputs.")
    infer.add_argument("run_dir", type=Path, nargs="?", help="run directory with checkpoints/unet.pth")
    infer.add_argument("--encoder", default="tu-tf_efficientnet_lite0", help="without a run: U-Net encoder")
    infer.add_argument("--size", type=int, help="input size (default: the run's, else 352)")
    infer.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    infer.add_argument("--iters", type=int, default=10, help="timed calls per backend and round")
    infer.add_argument("--rounds", type=int, default=3,
                       help="the backends take turns this many times; rows are medians over rounds, ratios the "
                            "median of per-round ratios (robust to a machine whose speed drifts)")
    infer.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its choice)")
    infer.add_argument("--out", type=Path, help="write the rows as JSON here")
    infer.set_defaults(func=cmd_bench_infer)
    maps = kinds.add_parser("maps", help="map throughput: CCAM inference vs Grad-CAM-family methods")
    maps.add_argument("--backbone", default="tf_efficientnet_lite0")
    maps.add_argument("--weights", default="none", help="weights do not change speed; none avoids downloads")
    maps.add_argument("--size", type=int, default=224)
    maps.add_argument("--batch-size", type=int, default=16)
    maps.add_argument("--methods", nargs="+", default=["ccam", "gradcam", "hirescam", "fullgrad"])
    maps.add_argument("--iters", type=int, default=5)
    maps.add_argument("--output-stride", type=int, default=16, help="CCAM backbone output stride (16 or 32)")
    maps.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    maps.add_argument("--out", type=Path, help="write the rows as JSON here")
    _add_map_quality_parser(kinds)
    _add_corrections_parser(kinds)
    _add_train_parser(kinds)
    _add_labels_parser(kinds)
    _add_select_parser(kinds)
    maps.set_defaults(func=cmd_bench_maps)


def _add_labelled_images_arguments(parser, n_images: int) -> None:
    """The images a bench scores on: a registered dataset's split (training images, never the reported ones)."""
    parser.add_argument("--dataset", default="kvasir_seg", help="registered dataset name (wsseg list datasets)")
    parser.add_argument("--root", default="kvasir-seg", help="dataset folder, relative to --data-root")
    parser.add_argument("--split", default="train")
    parser.add_argument("--data-root", type=Path, help="folder holding the datasets (default $WSSEG_DATA or ./data)")
    parser.add_argument("--n-images", type=int, default=n_images)


def _add_select_parser(kinds) -> None:
    select = kinds.add_parser(
        "select", help="how reliably a few labelled images choose the pseudo-mask producer (the select stage)",
        description="Scores every candidate of a run's select grid per image on a pool of labelled training "
                    "images (select.labelled), then replays the select stage on --draws random draws of each "
                    "--n-images from the pool and scores every choice on the pool's other images: the Dice to "
                    "expect from select at that many labelled images, next to the best candidate's. The run's "
                    "classifier and trained map methods are reused; the evaluation split is not read. Writes "
                    "select_study.json; a stopped bench continues where it stopped.")
    select.add_argument("run", type=Path, help="a run directory of a recipe with select.labelled (e.g. polyp_auto)")
    select.add_argument("--pool", type=int, default=100, help="labelled training images scored (default 100)")
    select.add_argument("--n-images", type=int, nargs="+", default=[10, 20],
                        help="labelled images select chooses on, each replayed (default: 10 20)")
    select.add_argument("--draws", type=int, default=1000, help="random draws per --n-images (default 1000)")
    select.add_argument("--pool-seed", type=int, default=0, help="the pool's draw and the replays' (default 0)")
    select.add_argument("--prefer-faster-within", type=float, nargs="+", metavar="MARGIN",
                        help="replay select with each Dice margin (select.prefer_faster_within: the fastest "
                             "candidate within it of the best), on the same draws (default: the recipe's value)")
    select.add_argument("--out", type=Path, help="where the linked run copy and select_study.json go "
                                                 "(default RUN/select_study)")
    select.add_argument("--data-root", type=Path, help="folder holding the datasets (default $WSSEG_DATA or ./data)")
    select.set_defaults(func=cmd_bench_select)


def cmd_bench_select(args) -> int:
    from rich.table import Table

    from wsseg.cli.ui import console, rich_progress, setup_console_logging
    from wsseg.report import cost_ms
    from wsseg.select_study import bench_select

    setup_console_logging(False)
    with rich_progress() as progress:
        result = bench_select(args.run, args.pool, args.n_images, args.draws, args.out, args.data_root,
                              args.pool_seed, progress=progress, prefer_faster_within=args.prefer_faster_within)
    best = result["pool_candidates"][0]
    table = Table(title=f"select replayed on draws from {len(result['pool'])} labelled training images "
                        "(Dice on the pool's other images)")
    for column in ("labelled images", "faster within", "draws", "select's choice", "10th percentile", "worst draw",
                   "best candidate", "choice's ms / image", "most chosen"):
        table.add_column(column, justify="left" if column == "most chosen" else "right")
    for r in result["replays"]:
        label, count = next(iter(r["chosen"].items()))
        table.add_row(str(r["n_images"]), f"{r['prefer_faster_within']:g}", str(r["draws"]), f"{r['choice_dice']:.3f}",
                      f"{r['choice_p10']:.3f}", f"{r['choice_min']:.3f}", f"{r['best_dice']:.3f}",
                      cost_ms({"seconds_per_image": r["choice_seconds_per_image"]}), f"{label} ({count / r['draws']:.0%})")
    console.print(table)
    console.print(f"best candidate on the whole pool: {best['candidate']} ({best['dice']:.3f}); "
                  f"every candidate and choice: {Path(args.out or args.run / 'select_study') / 'select_study.json'}")
    return 0


def _add_labels_parser(kinds) -> None:
    labels = kinds.add_parser(
        "labels", help="does ONNX Runtime (fp32, INT8) give a U-Net's masks as PyTorch does, and how much faster",
        description="Predicts images with a trained U-Net through each segment.inference_backend and compares "
                    "the masks (at --threshold, before refinement) with eager PyTorch's: Dice, pixel agreement, "
                    "time per image. Use training images: this is how to choose the backend of a recipe's rounds.")
    labels.add_argument("checkpoint", type=Path, help="a U-Net .pth (e.g. RUN/checkpoints/unet_round0.pth) or a run")
    _add_labelled_images_arguments(labels, n_images=48)
    labels.add_argument("--size", type=int, help="prediction size (default: the checkpoint's)")
    labels.add_argument("--flips", nargs="*", choices=["hflip", "vflip"], help="flips averaged (default: the checkpoint's)")
    labels.add_argument("--threshold", type=float, default=0.5, help="of the masks compared (segment.threshold)")
    labels.add_argument("--backends", nargs="+", default=["onnx", "onnx_int8"], choices=["onnx", "onnx_int8"])
    labels.add_argument("--out", type=Path, help="write the rows as JSON here")
    labels.set_defaults(func=cmd_bench_labels)


def cmd_bench_labels(args) -> int:
    from dataclasses import asdict, replace

    from rich.table import Table

    from wsseg.cli.ui import console
    from wsseg.config_schema import DatasetConfig
    from wsseg.data import create_dataset
    from wsseg.deploy.bench import backend_label_agreement
    from wsseg.models.segmenter import load_segmenter
    from wsseg.stages.common import write_json

    model, meta = load_segmenter(RunLayout(args.checkpoint).unet if args.checkpoint.is_dir() else args.checkpoint)
    meta = replace(meta, predict_size=args.size or meta.predict_size,
                   flips=meta.flips if args.flips is None else list(args.flips))
    dataset = create_dataset(DatasetConfig(args.dataset, args.root, args.split), args.data_root)
    rows = backend_label_agreement(model, meta, dataset, args.n_images, ["torch", *args.backends],
                                   threshold=args.threshold)
    table = Table(title=f"masks at {meta.input_size} px, flips {meta.flips or 'none'}, {len(dataset)} images "
                        f"({min(args.n_images, len(dataset))} used), against eager PyTorch")
    for column in ("backend", "s / image", "mean Dice", "min Dice", "pixel agreement", "max prob. difference"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    for r in rows:
        table.add_row(r.backend, f"{r.seconds_per_image:.3f}", f"{r.mean_dice:.4f}", f"{r.min_dice:.4f}",
                      f"{r.pixel_agreement:.5f}", f"{r.max_probability_difference:.2g}")
    console.print(table)
    if args.out:
        write_json(args.out, [asdict(r) for r in rows])
    return 0


def _add_train_parser(kinds) -> None:
    train = kinds.add_parser(
        "train", help="training steps/s: default vs channels-last memory, narrower decoder blocks, bf16 autocast",
        description="Times one training step (forward, loss, backward, AdamW) on a random batch for each variant, "
                    "the variants taking turns: what channels_last, segment.decoder_channels and cpu_amp (bf16 "
                    "autocast; fast only on CPUs with hardware bf16) save on this machine, for the U-Net "
                    "(segment.*) or, with --model classifier, the image classifier (classifier.*). Weights do not "
                    "change the speed.")
    train.add_argument("--model", choices=["unet", "classifier"], default="unet",
                       help="which network trains (default: unet)")
    train.add_argument("--encoder", help="U-Net encoder (smp name or tu-<timm>; default tu-tf_efficientnet_lite0) "
                                         "or classifier backbone (timm name; default tf_efficientnet_lite0)")
    train.add_argument("--size", type=int, default=256,
                       help="training crop size (segment.image_size or classifier.image_size; default 256)")
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--decoder-channels", type=int, nargs=5, default=[128, 64, 32, 16, 16], metavar="C",
                       help="the U-Net's narrower decoder timed beside the default (default: 128 64 32 16 16)")
    train.add_argument("--iters", type=int, default=3, help="timed steps per variant and round")
    train.add_argument("--rounds", type=int, default=3, help="the variants take turns this many times")
    train.add_argument("--out", type=Path, help="write the rows as JSON here")
    train.set_defaults(func=cmd_bench_train)


def cmd_bench_train(args) -> int:
    import torch

    from wsseg.deploy.bench import bench_training

    if args.model == "classifier":
        encoder = args.encoder or "tf_efficientnet_lite0"
        variants = {"default": {}, "channels_last": {"channels_last": True},
                    "bf16 autocast": {"cpu_amp": "bf16"},
                    "channels_last, bf16 autocast": {"channels_last": True, "cpu_amp": "bf16"}}
    else:
        encoder = args.encoder or "tu-tf_efficientnet_lite0"
        narrow = list(args.decoder_channels)
        variants = {"default": {}, "channels_last": {"channels_last": True},
                    f"decoder {narrow}": {"decoder_channels": narrow},
                    f"decoder {narrow}, channels_last": {"decoder_channels": narrow, "channels_last": True},
                    "channels_last, bf16 autocast": {"channels_last": True, "cpu_amp": "bf16"},
                    f"decoder {narrow}, channels_last, bf16 autocast": {"decoder_channels": narrow,
                                                                        "channels_last": True, "cpu_amp": "bf16"}}
    rows = bench_training(variants, encoder, args.size, args.batch_size, iters=args.iters, rounds=args.rounds,
                          model=args.model)
    name = "U-Net" if args.model == "unet" else "classifier"
    _print_rows(f"{name} training steps ({encoder}, {args.size} px, batch {args.batch_size}, "
                f"{torch.get_num_threads()} torch threads)", rows, args.out, f"{name} variant")
    return 0


def _add_corrections_parser(kinds) -> None:
    corrections = kinds.add_parser(
        "corrections", help="the hand-labelling the review loop saves: U-Net Dice against corrected training masks",
        description="Simulates a person who corrects a share of a finished run's training masks (their real mask "
                    "replaces the pseudo-mask), chosen least confident first or at random, and trains the recipe's "
                    "U-Net again for each share. Every stage before the U-Net comes from the run's cache. Writes "
                    "corrections.json and corrections.png; a stopped bench continues where it stopped.")
    corrections.add_argument("run", type=Path, help="a finished run directory whose segment.train has masks")
    corrections.add_argument("overrides", nargs="*", metavar="key=value",
                             help="applied to every point, e.g. segment.self_training_rounds=0 for a cheaper curve")
    corrections.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2],
                             help="shares of the training images corrected (default: 0 0.05 0.1 0.2)")
    corrections.add_argument("--choose", nargs="+", default=["confidence", "random"], choices=["confidence", "random"],
                             help="which images a person corrects: the least confident masks first, or at random")
    corrections.add_argument("--seed", type=int, default=0, help="the random draw")
    corrections.add_argument("--repeats", type=int, default=1,
                             help="train every point this many times, repeat r with the U-Net seed recipe seed + r "
                                  "and the random draw --seed + r; the table gives the mean and range (default 1)")
    corrections.add_argument("--supervised", metavar="RUN_DIR|DICE",
                             help="a run of the same U-Net on the real masks (e.g. polyp_supervised), or its recorded "
                                  "val Dice (e.g. 0.863): drawn as the line to reach")
    corrections.add_argument("--out", type=Path, help="where the points' runs and the curve go (default RUN/corrections)")
    corrections.add_argument("--data-root", type=Path, help="folder holding the datasets (default $WSSEG_DATA or ./data)")
    corrections.set_defaults(func=cmd_bench_corrections)


def _add_map_quality_parser(kinds) -> None:
    quality = kinds.add_parser(
        "map-quality", help="which map method, layer, size and threshold rule fits your data (Dice on labelled images)",
        description="Scores map methods of a trained classifier on a fixed sample of labelled images: mean Dice at "
                    "fixed thresholds, at each image's Otsu threshold, and with the best threshold per image (oracle). "
                    "Use training images, never the ones you report on. Candidates are every combination of "
                    "--methods, --layers, --sizes and --tta.")
    quality.add_argument("classifier", type=Path, help="a run directory (checkpoints/classifier.pth) or a classifier .pth")
    _add_labelled_images_arguments(quality, n_images=60)
    quality.add_argument("--methods", nargs="+", default=["gradcam", "layercam", "eigencam"])
    quality.add_argument("--layers", nargs="+", default=["auto"], help="target modules (auto: the last feature layer)")
    quality.add_argument("--sizes", type=int, nargs="+", default=[224])
    quality.add_argument("--tta", choices=["off", "on", "both"], default="off",
                         help="maps averaged over a horizontal flip and --tta-scales")
    quality.add_argument("--tta-scales", type=float, nargs="+", default=[0.7, 1.0], metavar="SCALE",
                         help="input scales averaged with --tta (default: 0.7 1.0)")
    quality.add_argument("--out", type=Path, help="write the scores as JSON here")
    quality.add_argument("--strict", action="store_true",
                         help="stop at the first unreadable image (default: leave it out and say so)")
    quality.set_defaults(func=cmd_bench_map_quality)


def cmd_bench_map_quality(args) -> int:
    from itertools import product

    from rich.table import Table

    from wsseg.cli.ui import console, rich_progress
    from wsseg.config_schema import DatasetConfig
    from wsseg.data import create_dataset
    from wsseg.selection import MapCandidate, score_map_methods
    from wsseg.stages.common import write_json

    checkpoint = RunLayout(args.classifier).classifier if args.classifier.is_dir() else args.classifier
    skipped = {}  # a bad file costs its own score only: it is left out, with a line saying why
    dataset = create_dataset(DatasetConfig(args.dataset, args.root, args.split), args.data_root, key="--dataset",
                             on_bad_image="error" if args.strict else "skip", bad_images=skipped)
    for reason in skipped.get("--dataset", []):
        print(f"wsseg bench map-quality: skipped {reason}", file=sys.stderr)
    tta = {"off": [False], "on": [True], "both": [False, True]}[args.tta]
    candidates = [MapCandidate(m, layer, size, t, tuple(args.tta_scales))
                  for m, layer, size, t in product(args.methods, args.layers, args.sizes, tta)]
    with rich_progress() as progress:
        results = score_map_methods(checkpoint, dataset, candidates, args.n_images, progress=progress)
    rules = list(results[0].dice)
    table = Table(title=f"mean Dice of map methods on {min(args.n_images, len(dataset))} images of "
                        f"{dataset.describe()} (best rule per row in bold)")
    table.add_column("method@layer size")
    for rule in rules:
        table.add_column(rule, justify="right")
    table.add_column("s", justify="right")
    for r in results:
        cells = [f"[bold]{r.dice[k]:.3f}[/bold]" if k == r.best_rule else f"{r.dice[k]:.3f}" for k in rules]
        table.add_row(r.candidate.label, *cells, f"{r.seconds:.0f}")
    console.print(table)
    if args.out:
        write_json(args.out, [{"candidate": vars(r.candidate), "dice": r.dice, "best_rule": r.best_rule,
                               "seconds": r.seconds} for r in results])
    return 0


def _print_rows(title: str, rows, out, first_column: str = "backend / method") -> None:
    from dataclasses import asdict

    from rich.table import Table

    from wsseg.cli.ui import console
    from wsseg.stages.common import write_json

    table = Table(title=title)
    ranges = any(r.ratio_range for r in rows)
    columns = [first_column, "batch", "images/s", "latency ms", "ratio"] + (["ratio range"] if ranges else [])
    for column in columns:
        table.add_column(column, justify="right" if column != first_column else "left")
    for r in rows:
        cells = [r.name, str(r.batch_size), f"{r.images_per_s:.1f}", f"{r.latency_ms:.1f}", f"{r.ratio:.2f}x"]
        if ranges:
            cells.append(f"{r.ratio_range[0]:.2f}-{r.ratio_range[1]:.2f}x" if r.ratio_range else "")
        table.add_row(*cells)
    console.print(table)
    if out:
        write_json(out, [asdict(r) for r in rows])


def cmd_bench_infer(args) -> int:
    import tempfile

    import torch

    from wsseg.deploy.bench import bench_inference
    from wsseg.deploy.onnx_export import export_segmenter
    from wsseg.models.segmenter import probability_model

    onnx_paths = {}
    if args.run_dir:
        from wsseg.models.segmenter import load_segmenter

        layout = RunLayout(args.run_dir)
        model, meta = load_segmenter(layout.unet)
        size = args.size or meta.input_size
        fp32 = layout.model_onnx
        if not fp32.is_file():
            export_segmenter(layout.unet, fp32)
        onnx_paths["onnxruntime fp32"] = fp32
        if layout.model_int8.is_file():
            onnx_paths["onnxruntime int8"] = layout.model_int8
    else:
        from wsseg.deploy.onnx_export import export_segmenter_model
        from wsseg.models.segmenter import SegmenterMeta, build_unet

        size = args.size or 352
        model = build_unet(args.encoder, "none")
        meta = SegmenterMeta(args.encoder, size, (0.5,) * 3, (0.5,) * 3, 0.5, trained_on="untrained (bench)")
        fp32 = Path(tempfile.mkdtemp()) / "model.onnx"
        export_segmenter_model(model, meta, fp32)
        onnx_paths["onnxruntime fp32"] = fp32
    torch_model = probability_model(model, meta).eval()  # the same flips as the exported graph
    rows = bench_inference(torch_model, onnx_paths, size, args.batch_sizes, iters=args.iters, threads=args.threads,
                           rounds=args.rounds)
    _print_rows(f"inference at {size}x{size}, {torch.get_num_threads()} torch threads", rows, args.out)
    return 0


def _supervised_dice(value: Optional[str]) -> Optional[float]:
    """`--supervised`: a number in (0, 1] is the Dice itself; anything else names a finished run folder."""
    import json

    from wsseg.errors import WssegError

    if value is None:
        return None
    try:
        dice = float(value)
    except ValueError:
        metrics_file = Path(value) / "metrics.json"
        if not metrics_file.is_file():
            raise WssegError(f"bench corrections --supervised: {metrics_file} does not exist "
                             "(give a finished run folder or a Dice such as 0.863)") from None
        dice = json.loads(metrics_file.read_text()).get("unet", {}).get("dice")
        if dice is None:
            raise WssegError(f"bench corrections --supervised: {metrics_file} has no unet Dice") from None
        return float(dice)
    if not 0 < dice <= 1:
        raise WssegError(f"bench corrections --supervised: a Dice lies in (0, 1], got {value}")
    return dice


def cmd_bench_corrections(args) -> int:
    from rich.table import Table

    from wsseg.cli.ui import console, rich_progress, setup_console_logging
    from wsseg.corrections import bench_corrections, summarise, write_curve

    setup_console_logging(False)
    supervised = _supervised_dice(args.supervised)
    out = args.out or args.run / "corrections"
    with rich_progress() as progress:
        points = bench_corrections(args.run, args.fractions, args.choose, out, args.overrides, args.data_root,
                                   args.seed, progress, repeats=args.repeats)
    files = write_curve(points, out, supervised, f"{args.run.name}: Dice against hand-corrected masks")
    repeated = args.repeats > 1
    table = Table(title="U-Net Dice against hand-corrected training masks"
                      + (f" (mean of {args.repeats} trainings, range)" if repeated else ""))
    columns = ("chosen by", "share", "masks corrected", "dice") + (("range",) if repeated else ()) + ("iou",)
    for column in columns + (("of supervised",) if supervised else ()):
        table.add_column(column, justify="left" if column == "chosen by" else "right")
    for r in summarise(points):
        row = [r["choose"], f"{r['fraction']:.0%}", str(r["n_corrected"]), f"{r['dice']:.3f}"]
        row += [f"{r['dice_low']:.3f}-{r['dice_high']:.3f}"] if repeated else []
        table.add_row(*row, f"{r['iou']:.3f}", *([f"{r['dice'] / supervised:.0%}"] if supervised else []))
    if supervised:
        table.add_row("fully supervised", "100%", "all", f"{supervised:.3f}", *([""] if repeated else []), "", "100%")
    console.print(table)
    console.print(f"curve: {files['plot']}, numbers: {files['json']}")
    return 0


def cmd_bench_maps(args) -> int:
    from wsseg.deploy.bench import bench_maps, map_method_callables

    methods = map_method_callables(args.backbone, args.weights, args.methods, output_stride=args.output_stride,
                                   image_size=args.size, threads=args.threads)
    rows = bench_maps(methods, args.size, args.batch_size, iters=args.iters)
    _print_rows(f"map throughput, {args.backbone} at {args.size}px, batch {args.batch_size}", rows, args.out)
    return 0
