"""`wsseg-infer model.onnx IMAGES_OR_DIRS... --out DIR`: masks (and overlays) for a folder of images."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List

import numpy as np
from PIL import Image

from wsseg_infer.runtime import InputError, Segmenter, load_image

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def collect(inputs: List[str]) -> List[Path]:
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in EXTENSIONS)
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    if not files:
        raise InputError(f"no images found in {', '.join(inputs)}")
    return files


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = image.astype(np.float32).copy()
    out[mask] = 0.5 * out[mask] + 0.5 * np.array([0, 255, 0], np.float32)
    return out.astype(np.uint8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="wsseg-infer", description="Segment images with an ONNX model exported "
                                     "by wsseg (no torch needed). Writes <out>/<stem>.png masks (0/255).")
    parser.add_argument("model", type=Path, help="model.onnx written by `wsseg export` or a recipe run")
    parser.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for masks")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: onnxruntime's choice)")
    parser.add_argument("--fp16", action="store_true", help="run an fp16 copy of the model on CUDA")
    parser.add_argument("--overlays", action="store_true", help="also write <stem>_overlay.jpg")
    args = parser.parse_args(argv)
    try:
        segmenter = Segmenter(args.model, args.device, args.threads, args.fp16)
        files = collect(args.inputs)
        args.out.mkdir(parents=True, exist_ok=True)
        start, done = time.perf_counter(), 0
        for begin in range(0, len(files), args.batch_size):
            chunk = files[begin:begin + args.batch_size]
            images = [load_image(p) for p in chunk]
            for path, image, mask in zip(chunk, images, segmenter.masks(images, args.batch_size)):
                Image.fromarray(mask.astype(np.uint8) * 255).save(args.out / f"{path.stem}.png")
                if args.overlays:
                    Image.fromarray(overlay(image, mask)).save(args.out / f"{path.stem}_overlay.jpg")
            done += len(chunk)
        seconds = time.perf_counter() - start
        print(f"{done} images in {seconds:.2f} s ({done / seconds:.1f} images/s) on {segmenter.providers[0]}; "
              f"masks in {args.out}")
    except InputError as exc:
        print(f"wsseg-infer: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
