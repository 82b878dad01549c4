"""The mask formats, each a writer and a reader. Kept libraries do the encoding: pycocotools for COCO RLE
(also what CVAT's COCO 1.0 import reads), label-studio-converter for Label Studio's brush RLE."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from wsseg.errors import DataError, WssegError


@dataclass
class MaskItem:
    stem: str  # the image's stem: how wsseg names its masks
    file_name: str  # the image file name, as the annotation tool knows the image
    mask: np.ndarray  # boolean, at the image's own size
    confidence: Optional[float] = None  # wsseg.confidence: how sure its writer was (None: not recorded)


@dataclass(frozen=True)
class MaskFormat:
    write: Callable[[List[MaskItem], Path, str], Path]
    read: Callable[[Path], Dict[str, np.ndarray]]
    describe: str


def _atomic_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    return path


def _load_json(path: Path, what: str):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise WssegError(f"{path}: no such file ({what} expected)") from None
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); expected {what}") from None


def _pycocotools():
    try:
        from pycocotools import mask as coco_mask
    except ImportError as exc:
        raise WssegError("COCO and CVAT masks need pycocotools: pip install pycocotools") from exc
    return coco_mask


# ---------------------------------------------------------------------------------------------- COCO


def write_coco(items: List[MaskItem], out: Path, label: str) -> Path:
    """COCO instance JSON: one image entry per mask and one RLE annotation (iscrowd 1) per non-empty mask."""
    coco_mask = _pycocotools()
    images, annotations = [], []
    for image_id, item in enumerate(items, start=1):
        height, width = item.mask.shape
        images.append({"id": image_id, "file_name": item.file_name, "width": width, "height": height})
        if not item.mask.any():
            continue
        rle = coco_mask.encode(np.asfortranarray(item.mask.astype(np.uint8)))
        annotation = {"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 1,
                      "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
                      "area": float(coco_mask.area(rle)), "bbox": [float(v) for v in coco_mask.toBbox(rle)]}
        if item.confidence is not None:
            annotation["score"] = item.confidence  # COCO's results field: tools sort and filter by it
        annotations.append(annotation)
    return _atomic_json(out, {"images": images, "annotations": annotations,
                              "categories": [{"id": 1, "name": label, "supercategory": ""}]})


def read_coco(path: Path) -> Dict[str, np.ndarray]:
    """Every image of a COCO JSON with the union of its masks (RLE or polygons); an image without
    annotations has an empty mask."""
    coco_mask = _pycocotools()
    data = _load_json(path, "COCO instance JSON")
    try:
        images = {image["id"]: image for image in data["images"]}
        masks = {i: np.zeros((img["height"], img["width"]), bool) for i, img in images.items()}
        for annotation in data.get("annotations", []):
            image = images[annotation["image_id"]]
            height, width = image["height"], image["width"]
            segmentation = annotation["segmentation"]
            if isinstance(segmentation, list):  # polygons, as drawn in a tool
                rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
            elif isinstance(segmentation["counts"], list):  # uncompressed RLE
                rle = coco_mask.frPyObjects(segmentation, height, width)
            else:
                rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
            masks[annotation["image_id"]] |= coco_mask.decode(rle).astype(bool)
    except (KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a COCO instance file (missing or wrong {exc})") from None
    return {Path(images[i]["file_name"]).stem: mask for i, mask in masks.items()}


# ---------------------------------------------------------------------------------------------- Label Studio


def _brush():
    try:
        from label_studio_converter import brush
    except ImportError as exc:
        raise WssegError("Label Studio masks need label-studio-converter: pip install label-studio-converter") from exc
    return brush


def write_labelstudio(items: List[MaskItem], out: Path, label: str) -> Path:
    """Label Studio tasks with brush pre-annotations (`predictions`), for a labelling config with
    `<Image name="image" value="$image"/>` and `<BrushLabels name="label" toName="image">`."""
    brush = _brush()
    tasks = []
    for item in items:
        height, width = item.mask.shape
        result = []
        if item.mask.any():
            result.append({"id": item.stem, "type": "brushlabels", "from_name": "label", "to_name": "image",
                           "original_width": width, "original_height": height, "image_rotation": 0,
                           "value": {"format": "rle", "rle": brush.mask2rle(item.mask.astype(np.uint8) * 255),
                                     "brushlabels": [label]}})
        prediction = {"model_version": "wsseg", "result": result}
        if item.confidence is not None:
            prediction["score"] = item.confidence  # Label Studio sorts tasks by prediction score
        tasks.append({"data": {"image": item.file_name, "wsseg_size": [height, width]}, "predictions": [prediction]})
    return _atomic_json(out, tasks)


def read_labelstudio(path: Path) -> Dict[str, np.ndarray]:
    """Masks from Label Studio's JSON export (or wsseg's pre-annotations): a task's latest annotation when a
    person made one, else its prediction; brush results of every label united."""
    brush = _brush()
    tasks = _load_json(path, "Label Studio JSON tasks")
    masks = {}
    try:
        for task in tasks:
            stem = Path(str(task["data"]["image"]).split("?")[0]).stem
            runs = task.get("annotations") or task.get("predictions") or []
            results = runs[-1].get("result", []) if runs else []
            size = task["data"].get("wsseg_size")
            mask = None if size is None else np.zeros(size, bool)
            for result in results:
                if result.get("type") != "brushlabels":
                    continue
                height, width = result["original_height"], result["original_width"]
                pixels = brush.decode_rle(result["value"]["rle"]).reshape(height, width, 4)[..., 3] > 0
                mask = pixels if mask is None else mask | pixels
            if mask is None:
                raise DataError(f"{path}: task for {task['data']['image']} has no brush result and no size")
            masks[stem] = mask
    except (KeyError, TypeError, IndexError) as exc:
        raise DataError(f"{path}: not Label Studio tasks (missing or wrong {exc})") from None
    return masks


# ---------------------------------------------------------------------------------------------- PNG


def write_png(items: List[MaskItem], out: Path, label: str) -> Path:
    from wsseg.data.io import write_mask_png

    out.mkdir(parents=True, exist_ok=True)
    for item in items:
        write_mask_png(out / f"{item.stem}.png", item.mask)
    return out


def read_png(path: Path) -> Dict[str, np.ndarray]:
    from wsseg.data.io import read_binary_mask

    if not Path(path).is_dir():
        raise WssegError(f"{path}: not a folder of PNG masks")
    return {p.stem: read_binary_mask(p) for p in sorted(Path(path).glob("*.png"))}


FORMATS = {
    "coco": MaskFormat(write_coco, read_coco, "COCO instance JSON, RLE masks (pycocotools)"),
    # CVAT reads COCO 1.0 (Import dataset / Upload annotations -> "COCO 1.0"), RLE masks with iscrowd 1.
    "cvat": MaskFormat(write_coco, read_coco, "COCO 1.0 JSON as CVAT imports and exports it"),
    "labelstudio": MaskFormat(write_labelstudio, read_labelstudio, "Label Studio tasks, brush RLE"),
    "png": MaskFormat(write_png, read_png, "a folder of <stem>.png masks, 0/255"),
}
