"""Overlay grids a person looks at: image | map | pseudo-mask | U-Net | ground truth, one row per image."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np

from wsseg.data.base import SegmentationDataset
from wsseg.data.io import read_binary_mask
from wsseg.pipeline.layout import RunLayout
from wsseg.stages.maps import load_map
from wsseg.stages.pseudo_masks import resize_map

TILE = 160


def _tile(array: np.ndarray) -> np.ndarray:
    return cv2.resize(array, (TILE, TILE), interpolation=cv2.INTER_AREA if array.shape[0] > TILE else cv2.INTER_LINEAR)


def _overlay(image: np.ndarray, mask: np.ndarray, colour=(0, 255, 0)) -> np.ndarray:
    out = image.astype(np.float32).copy()
    out[mask] = 0.55 * out[mask] + 0.45 * np.array(colour, np.float32)
    edges = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool)
    out[edges] = colour
    return out.astype(np.uint8)


def _heat(activation: np.ndarray, image: np.ndarray) -> np.ndarray:
    colour = cv2.applyColorMap((activation * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    return (0.5 * image + 0.5 * colour).astype(np.uint8)


def overlay_grid(path: Path, dataset: SegmentationDataset, indices: Sequence[int], run_dir: Path, method: str,
                 segmenter: Optional[str] = "unet", dice: Optional[Dict[str, float]] = None) -> Path:
    """Write one PNG: a row per image with the columns named in the title row."""
    from PIL import Image, ImageDraw

    layout = RunLayout(run_dir)
    columns = ["image", f"{method} map", f"{method} mask"]
    has_unet = segmenter is not None and layout.masks(segmenter).is_dir()
    if has_unet:
        columns.append(segmenter)
    columns.append("ground truth")
    rows = []
    for index in indices:
        stem = dataset.records[index].stem
        image = dataset.load_image(index)
        height, width = image.shape[:2]
        tiles = [image]
        map_path = layout.maps(method) / f"{stem}.npy"
        activation = resize_map(load_map(map_path), height, width) if map_path.is_file() else np.zeros((height, width))
        tiles.append(_heat(activation, image))
        tiles.append(_overlay(image, read_binary_mask(layout.masks(method) / f"{stem}.png")))
        if has_unet:
            tiles.append(_overlay(image, read_binary_mask(layout.masks(segmenter) / f"{stem}.png"), (255, 200, 0)))
        truth = dataset.load_mask(index)
        tiles.append(_overlay(image, truth, (255, 0, 255)) if truth is not None else np.zeros_like(image))
        row = np.concatenate([_tile(t) for t in tiles], axis=1)
        rows.append((row, stem, (dice or {}).get(stem)))
    header = 22
    canvas = Image.new("RGB", (TILE * len(columns), header + len(rows) * (TILE + header)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, name in enumerate(columns):
        draw.text((k * TILE + 4, 4), name, fill="black")
    for r, (row, stem, score) in enumerate(rows):
        top = header + r * (TILE + header)
        label = stem if score is None else f"{stem}  dice {score:.3f}"
        draw.text((4, top + 4), label, fill="black")
        canvas.paste(Image.fromarray(row), (0, top + header))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def write_run_grids(run_dir: Path, dataset: SegmentationDataset, rows: List[Dict], methods: Sequence[str],
                    n_images: int = 6) -> List[Path]:
    """For each map method: a fixed sample (evenly spaced images) and the worst images by Dice."""
    plots = RunLayout(run_dir).plots
    written = []
    sample = dataset.spread(n_images)
    index_of = {r.stem: i for i, r in enumerate(dataset.records)}
    for method in methods:
        dice = {r["stem"]: r["dice"] for r in rows if r["method"] == method}
        if not dice:
            continue
        worst = [index_of[s] for s in sorted(dice, key=dice.get)[:n_images]]
        written.append(overlay_grid(plots / f"grid_{method}_sample.png", dataset, sample, run_dir, method, dice=dice))
        written.append(overlay_grid(plots / f"grid_{method}_worst.png", dataset, worst, run_dir, method, dice=dice))
    return written
