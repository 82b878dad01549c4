"""`wsseg-infer model.onnx IMAGES_OR_DIRS... --out DIR`: masks (and overlays) for a folder of images.

A large job keeps going past bad files: every readable image gets its mask, each unreadable one a line on
stderr and an entry in `<out>/skipped.json`, and the exit status says whether anything was skipped.
Masks are written atomically, so `--skip-existing` after a kill continues where the job stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Sequence

import numpy as np
from PIL import Image

from wsseg_infer.runtime import InputError, Segmenter, load_image

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
#: Exit status when every readable image got its mask but some files were skipped (2 is a usage error).
EXIT_SKIPPED = 1


def collect(inputs: Sequence[str]) -> List[Path]:
    """Image files named directly, and those with an image extension below each folder (recursively;
    other files in a folder, such as notes.txt, are ignored)."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    if not files:
        raise InputError(f"no images found in {', '.join(map(str, inputs))}")
    return files


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = image.astype(np.float32).copy()
    out[mask] = 0.5 * out[mask] + 0.5 * np.array([0, 255, 0], np.float32)
    return out.astype(np.uint8)


def save_atomic(array: np.ndarray, path: Path, image_format: str) -> None:
    """Write under a temporary name, then rename: a killed job never leaves a half-written file under the
    final name (which `--skip-existing` would take as done)."""
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format=image_format)
    os.replace(tmp, path)


@dataclass
class FolderJob:
    """What a run over many images did: how many masks it wrote, which it found done, which it skipped."""

    written: int = 0
    existing: int = 0
    skipped: List[dict] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        parts = [f"{self.written} written", f"{len(self.skipped)} skipped"]
        if self.existing:
            parts.append(f"{self.existing} already there (--skip-existing)")
        return ", ".join(parts)


def segment_files(files: Sequence[Path], out: Path,
                  masks_of: Callable[[List[Path], List[np.ndarray]], List[np.ndarray]],
                  batch_size: int = 8, overlays: bool = False, strict: bool = False, skip_existing: bool = False,
                  warn=None) -> FolderJob:
    """Write `<out>/<stem>.png` (0/255) for every readable file; `masks_of(paths, images)` returns boolean
    masks at each image's size. Unreadable files are skipped with a line through `warn` (stderr by default) unless
    `strict`, which raises at the first one. `<out>/skipped.json` lists the skipped files and why."""
    warn = warn or (lambda text: print(text, file=sys.stderr))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    job, start = FolderJob(), time.perf_counter()
    pending = []
    for path in files:
        if skip_existing and (out / f"{path.stem}.png").is_file():
            job.existing += 1
        else:
            pending.append(path)
    for begin in range(0, len(pending), batch_size):
        chunk, images = [], []
        for path in pending[begin:begin + batch_size]:
            try:
                images.append(load_image(path))
                chunk.append(path)
            except InputError as exc:
                if strict:
                    raise
                job.skipped.append({"path": str(path), "reason": str(exc)})
                warn(f"skipped {exc}")
        if not images:
            continue
        for path, image, mask in zip(chunk, images, masks_of(chunk, images)):
            save_atomic(mask.astype(np.uint8) * 255, out / f"{path.stem}.png", "PNG")
            if overlays:
                save_atomic(overlay(image, mask), out / f"{path.stem}_overlay.jpg", "JPEG")
            job.written += 1
    job.seconds = time.perf_counter() - start
    record = out / "skipped.json"
    if job.skipped:
        tmp = record.with_name(f".{record.name}.tmp")
        tmp.write_text(json.dumps(job.skipped, indent=2))
        os.replace(tmp, record)
    elif record.is_file():
        record.unlink()  # a rerun that found every file readable leaves no stale list behind
    return job


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every command that segments a folder shares (wsseg-infer, wsseg predict)."""
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--overlays", action="store_true", help="also write <stem>_overlay.jpg")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first unreadable file (default: skip it, list it in <out>/skipped.json "
                             f"and exit with status {EXIT_SKIPPED})")
    parser.add_argument("--skip-existing", action="store_true",
                        help="leave images whose mask is already in --out alone (continue a killed job)")


def report(job: FolderJob, out: Path, backend: str, prog: str = "wsseg-infer") -> int:
    """Print the closing summary; the exit status is non-zero when any file was skipped."""
    rate = f" ({job.written / job.seconds:.1f} images/s)" if job.written and job.seconds > 0 else ""
    print(f"{job.summary()} in {job.seconds:.2f} s{rate} on {backend}; masks in {out}")
    if job.skipped:
        print(f"{prog}: {len(job.skipped)} unreadable files skipped, listed in {out / 'skipped.json'}",
              file=sys.stderr)
        return EXIT_SKIPPED
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="wsseg-infer", description="Segment images with an ONNX model exported by wsseg (no torch needed). "
        "Writes <out>/<stem>.png masks (0/255); unreadable files are skipped and listed in <out>/skipped.json.")
    parser.add_argument("model", type=Path, help="model.onnx written by `wsseg export` or a recipe run")
    parser.add_argument("inputs", nargs="+", help="image files or folders (searched recursively for images)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for masks")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: onnxruntime's choice)")
    parser.add_argument("--fp16", action="store_true", help="run an fp16 copy of the model on CUDA")
    add_job_arguments(parser)
    args = parser.parse_args(argv)
    try:
        segmenter = Segmenter(args.model, args.device, args.threads, args.fp16)
        files = collect(args.inputs)
        job = segment_files(files, args.out, lambda paths, images: segmenter.masks(images, args.batch_size),
                            args.batch_size, args.overlays, args.strict, args.skip_existing,
                            warn=lambda text: print(f"wsseg-infer: {text}", file=sys.stderr))
    except InputError as exc:
        print(f"wsseg-infer: error: {exc}", file=sys.stderr)
        return 2
    return report(job, args.out, segmenter.providers[0])


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["FolderJob", "collect", "main", "segment_files"]
