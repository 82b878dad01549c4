"""Masks in and out of annotation tools: COCO (RLE, through pycocotools), CVAT (its COCO 1.0 import),
Label Studio (brush pre-annotations, through label-studio-converter) and a PNG folder.

`export_run_masks` writes one producer's masks of a run; `read_masks` reads corrected masks back, in
any of the formats, as {image stem: boolean mask}, which `wsseg masks import` writes as a png folder.
Every format round-trips bit for bit at each image's own size (tests/test_annotations.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from wsseg._registry import Registry
from wsseg.annotations.formats import MaskItem
from wsseg.annotations import formats

FORMATS: Registry = Registry("mask format")
for _name, _format in formats.FORMATS.items():
    FORMATS.register(_name)(_format)


def list_formats() -> List[str]:
    return FORMATS.names()


def write_masks(items: List[MaskItem], fmt: str, out: Path, label: str = "object") -> Path:
    """Write `items` in format `fmt` at `out` (a file for coco / cvat / labelstudio, a folder for png)."""
    return FORMATS.get(fmt).write(items, Path(out), label)


def read_masks(path: Path, fmt: str) -> Dict[str, "np.ndarray"]:  # noqa: F821
    """{image stem: boolean mask} from a file (or folder) in format `fmt`."""
    return FORMATS.get(fmt).read(Path(path))


def run_mask_items(run_dir: Path, producer: str = "unet", data_root=None,
                   least_confident: Optional[int] = None) -> List[MaskItem]:
    """The masks producer `producer` wrote in a run (`masks/<producer>/*.png`), each named as its image file
    (read from the run's `maps.dataset` when it can be found, else `<stem>.png`) with its confidence;
    `least_confident`: only that many, the least confident first (the ones worth a person's look)."""
    from wsseg.confidence import read_confidence
    from wsseg.data.io import read_binary_mask
    from wsseg.errors import WssegError
    from wsseg.pipeline.layout import RunLayout

    layout = RunLayout(run_dir)
    folder = layout.masks(producer)
    if not folder.is_dir():
        made = sorted(p.name for p in (layout.root / "masks").glob("*") if p.is_dir())
        raise WssegError(f"{folder}: no masks of producer '{producer}' in this run (it has: {', '.join(made) or 'none'})")
    names = _image_names(layout, data_root)
    confidence = read_confidence(folder)
    paths = sorted(folder.glob("*.png"))
    if least_confident is not None:
        if not confidence:
            raise WssegError(f"{folder}: its writer recorded no confidence, so there is no least confident mask")
        paths = sorted(paths, key=lambda p: confidence.get(p.stem, 1.0))[:least_confident]
    return [MaskItem(p.stem, names.get(p.stem, f"{p.stem}.png"), read_binary_mask(p), confidence.get(p.stem))
            for p in paths]


def _image_names(layout, data_root=None) -> Dict[str, str]:
    """stem -> image file name from the run's evaluation dataset; empty when it cannot be read here."""
    import logging

    from wsseg.config import load_recipe
    from wsseg.data import DatasetCatalog
    from wsseg.errors import WssegError

    try:
        config = load_recipe(str(layout.config))
        dataset = DatasetCatalog(data_root, "skip").get(config.maps.dataset, "maps.dataset")
    except (WssegError, OSError) as exc:
        logging.getLogger("wsseg").warning("image names not found (%s); masks are named <stem>.png", exc)
        return {}
    return {r.stem: Path(r.image_path).name for r in dataset.records if r.image_path is not None}


def export_run_masks(run_dir: Path, fmt: str, out: Path, producer: str = "unet", label: str = "object",
                     data_root=None, least_confident: Optional[int] = None) -> Path:
    return write_masks(run_mask_items(run_dir, producer, data_root, least_confident), fmt, out, label)


__all__ = ["FORMATS", "MaskItem", "export_run_masks", "list_formats", "read_masks", "run_mask_items",
           "write_masks"]
