"""`wsseg export` and `wsseg predict`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsseg.pipeline.layout import RunLayout


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text}")
    return value


def add_parser(subparsers) -> None:
    export = subparsers.add_parser("export", help="export a run's U-Net (and CCAM) to ONNX with a parity check")
    export.add_argument("run_dir", type=Path, help="a finished run directory (holds checkpoints/unet.pth)")
    export.add_argument("--out", type=Path, help="ONNX file for the U-Net (default RUN_DIR/model.onnx)")
    export.add_argument("--opset", type=int, default=17)
    export.add_argument("--size", type=int, help="input size of the exported model (default: the size the run's "
                        "U-Net predicts at, segment.predict.size)")
    export.add_argument("--flips", nargs="*", metavar="FLIP", help="flips averaged inside the graph: hflip, vflip, "
                        "or none for a plain, faster model (default: the run's segment.predict flips)")
    export.add_argument("--threshold", type=float, help="mask threshold stored in the model (default: the run's "
                        "U-Net's, calibrated or fixed)")
    export.add_argument("--int8", action="store_true", help="also write model.int8.onnx (static, calibrated)")
    export.add_argument("--data-root", type=Path, help="data root for the INT8 calibration images")
    export.add_argument("--calibration-images", type=_positive_int, metavar="N",
                        help="INT8 calibration images from the U-Net's training set (default: the run's "
                             "export.calibration_images)")
    export.add_argument("--int8-keep-float", nargs="*", default=["/encoder/"], metavar="PATTERN",
                        help="ONNX node-name substrings that stay fp32 in the INT8 model (default: the encoder; "
                             "none: quantise everything; auto: measure each encoder stage on the calibration "
                             "images and keep the sensitive ones and the depthwise convs in fp32)")
    export.set_defaults(func=cmd_export)

    predict = subparsers.add_parser("predict", help="segment images with a run's U-Net (torch or ONNX backend)")
    predict.add_argument("model", type=Path, help="run directory, unet.pth or model.onnx")
    predict.add_argument("inputs", nargs="+", help="image files or folders")
    predict.add_argument("--out", type=Path, required=True, help="folder for <stem>.png masks")
    predict.add_argument("--backend", choices=["torch", "onnx"], default="onnx")
    from wsseg_infer.cli import add_job_arguments

    add_job_arguments(predict)
    predict.set_defaults(func=cmd_predict)


def cmd_export(args) -> int:
    from wsseg.cli.ui import console
    from wsseg.deploy.onnx_export import export_segmenter, read_metadata

    layout = RunLayout(args.run_dir)
    out = args.out or layout.model_onnx
    flips = [] if args.flips in (["none"], []) else args.flips
    report = export_segmenter(layout.unet, out, args.opset, args.size, flips,
                              args.threshold)
    meta = read_metadata(report.path)
    console.print(f"[green]exported[/green] {report.path} (opset {report.opset}; input {meta['input_size']} px, "
                  f"flips {meta['flips_averaged']}, threshold {meta['threshold']}); parity at "
                  f"{report.parity_shape}: max |onnx - torch| = {report.max_abs_diff:.2e}")
    if args.int8:
        from wsseg.deploy.quantize import describe_kept_float, quantize_from_run

        int8 = quantize_from_run(args.run_dir, args.calibration_images, args.data_root, args.int8_keep_float,
                                 model_path=out)
        console.print(f"[green]INT8[/green] {int8['path']} (fp32 kept: {describe_kept_float(Path(int8['path']))}); "
                      f"masks vs fp32 on {int8['calibration_images']} calibration images: "
                      f"Dice {int8['mask_dice_vs_fp32']:.4f}, mean |prob diff| {int8['mean_abs_prob_diff']:.4f}")
    return 0


def _find(model: Path, backend: str) -> Path:
    if model.is_dir():
        return RunLayout(model).model_onnx if backend == "onnx" else RunLayout(model).unet
    return model


def cmd_predict(args) -> int:
    from wsseg_infer import cli as infer_cli

    path = _find(args.model, args.backend)
    if args.backend == "onnx":
        argv = [str(path), *args.inputs, "--out", str(args.out), "--batch-size", str(args.batch_size)]
        flags = [f"--{name.replace('_', '-')}" for name in ("overlays", "strict", "skip_existing") if getattr(args, name)]
        return infer_cli.main(argv + flags)
    from wsseg.data.base import Record, SegmentationDataset
    from wsseg.device import resolve_device
    from wsseg.errors import WssegError
    from wsseg.stages.segment import load_segmenter, predict_masks

    model, meta = load_segmenter(path)
    device = resolve_device("auto")

    def masks_of(paths, images):
        dataset = SegmentationDataset([Record(p.stem, p, 0) for p in paths], ["image"])
        return predict_masks(model, meta, dataset, None, device, args.batch_size, keep=True)

    try:
        job = infer_cli.segment_files(infer_cli.collect(args.inputs), args.out, masks_of, args.batch_size,
                                      args.overlays, args.strict, args.skip_existing,
                                      warn=lambda text: print(f"wsseg predict: {text}", file=sys.stderr))
    except infer_cli.InputError as exc:
        raise WssegError(str(exc)) from None
    return infer_cli.report(job, args.out, "torch", prog="wsseg predict")
