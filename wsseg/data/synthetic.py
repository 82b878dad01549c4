"""Procedural polyp-like scenes with exact masks: the embedded default dataset that runs anywhere.

Each image is textured, vignetted "tissue"; positives hold one or more blob-shaped objects of varied
size, colour and texture (some cut by the border); negatives hold none. Everything is a pure function
of (seed, split, index), so two runs see identical data without any files.
"""

from __future__ import annotations

import zlib
from typing import Optional

import cv2
import numpy as np

from wsseg.data.base import Record, SegmentationDataset


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _blob_polygon(rng: np.random.Generator, center, radius: float, n_points: int = 64) -> np.ndarray:
    theta = np.linspace(0, 2 * np.pi, n_points, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 5):  # low harmonics give lumpy, polyp-like outlines
        r += rng.uniform(0, 0.15) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    aspect = rng.uniform(0.7, 1.3)
    xs = center[0] + radius * r * np.cos(theta) * aspect
    ys = center[1] + radius * r * np.sin(theta) / aspect
    return np.stack([xs, ys], axis=1).round().astype(np.int32)


def render_scene(seed: int, size: int = 128, n_objects: int = 1):
    """Return (HxWx3 uint8 image, HxW bool mask) for one synthetic scene."""
    rng = np.random.default_rng(seed)
    base = np.array([rng.uniform(170, 220), rng.uniform(90, 130), rng.uniform(80, 120)], dtype=np.float32)
    texture = 18 * _smooth_noise(rng, size, 6) + 8 * _smooth_noise(rng, size, 24)
    image = base[None, None, :] + texture[..., None] * np.array([1.0, 0.8, 0.7], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) - 0.5
    vignette = 1.0 - rng.uniform(0.3, 0.8) * (xx**2 + yy**2) * 2
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(n_objects):
        radius = rng.uniform(0.08, 0.28) * size
        center = rng.uniform(0.1, 0.9, size=2) * size
        if rng.random() < 0.25:  # push some objects against the border
            axis = rng.integers(2)
            center[axis] = rng.choice([radius * 0.4, size - radius * 0.4])
        blob = np.zeros_like(mask)
        cv2.fillPoly(blob, [_blob_polygon(rng, center, radius)], 1)
        shade = np.clip(1.0 - ((xx * size - center[0] + size / 2) ** 2 + (yy * size - center[1] + size / 2) ** 2)
                        / (radius**2 * 2.5), 0.3, 1.0)
        colour = np.array([rng.uniform(150, 240), rng.uniform(50, 110), rng.uniform(40, 100)], dtype=np.float32)
        blob_tex = 25 * _smooth_noise(rng, size, 16)
        obj = colour[None, None, :] * (0.6 + 0.5 * shade[..., None]) + blob_tex[..., None]
        soft = cv2.GaussianBlur(blob.astype(np.float32), (3, 3), 0)[..., None]
        image = image * (1 - soft) + obj * soft
        mask |= blob
    image = image * vignette[..., None] + rng.normal(0, 3, size=(size, size, 1)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), mask.astype(bool)


# Rendering costs a few ms a scene and every epoch asks for each scene again (image and mask separately), so
# rendered scenes are kept in memory up to this many bytes per dataset; beyond it they are rendered on demand.
CACHE_BYTES = 512 * 2**20


class SyntheticScenes(SegmentationDataset):
    """`n` scenes, a `negative_fraction` of them without objects; splits draw from separate seeds."""

    name = "synthetic"

    def __init__(self, root=None, split: Optional[str] = "train", n: int = 200, size: int = 128,
                 negative_fraction: float = 0.4, max_objects: int = 2, seed: int = 0):
        self.size, self.max_objects = size, max_objects
        self.split = split or "train"
        self.base_seed = zlib.crc32(f"{seed}:{self.split}".encode())
        rng = np.random.default_rng(self.base_seed)
        labels = (rng.random(n) >= negative_fraction).astype(int)
        records = [Record(f"synth_{self.split}_{i:05d}", None, int(labels[i]), None) for i in range(n)]
        super().__init__(records, ["background", "object"], positive_index=1)
        self._rendered: dict = {}
        self._cache_capacity = CACHE_BYTES // (4 * size * size)  # image (3 bytes a pixel) and mask (1)

    def describe(self) -> str:
        return f"synthetic split {self.split}"

    @property
    def has_masks(self) -> bool:
        return True

    def _scene(self, index: int):
        stem = self.records[index].stem  # not the index: subset() renumbers the records
        scene = self._rendered.get(stem)
        if scene is None:
            scene = self._render(stem, self.records[index].label)
            if len(self._rendered) < self._cache_capacity:
                self._rendered[stem] = scene
        return scene

    def _render(self, stem: str, label: int):
        i = int(stem.rsplit("_", 1)[1])
        n_objects = 0
        if label:
            n_objects = 1 + int(np.random.default_rng([self.base_seed, i, 7]).integers(self.max_objects))
        return render_scene(self.base_seed * 100003 + i, self.size, n_objects)

    def load_image(self, index: int, max_side: Optional[int] = None) -> np.ndarray:
        return self._scene(index)[0].copy()  # copies: a caller may draw on what it gets

    def load_mask(self, index: int) -> np.ndarray:
        return self._scene(index)[1].copy()

    def image_size(self, index: int) -> tuple:
        return (self.size, self.size)
