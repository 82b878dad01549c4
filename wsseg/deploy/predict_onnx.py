"""Masks from an exported model through the deployment runtime, written like every other producer's."""

from __future__ import annotations

from pathlib import Path

from wsseg.data.base import SegmentationDataset
from wsseg.data.io import write_mask_png


def write_onnx_masks(model_path: Path, dataset: SegmentationDataset, out_dir: Path, batch_size: int = 8) -> Path:
    from wsseg_infer.runtime import Segmenter

    segmenter = Segmenter(model_path, device="auto")
    out_dir = Path(out_dir)
    for start in range(0, len(dataset), batch_size):
        indices = list(range(start, min(start + batch_size, len(dataset))))
        masks = segmenter.masks([dataset.load_image(i) for i in indices], batch_size)
        for i, mask in zip(indices, masks):
            write_mask_png(out_dir / f"{dataset.records[i].stem}.png", mask)
    return out_dir
