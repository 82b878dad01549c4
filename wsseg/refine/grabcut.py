"""GrabCut (Rother et al., 2004) on a mask: colour models of object and background, then a graph cut.

A mask step: it starts from the thresholded mask (e.g. after `dense_crf`) as "probably object" /
"probably background" and pins the pixels where the *source* map is far above or below its Otsu level
as certain. The dense CRF moves edges locally; GrabCut's per-image colour models can also add or drop
whole regions that look like the object. It runs on a copy of the image scaled to `max_side`.
"""

from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

from wsseg.errors import ConfigError
from wsseg.refine import MASK_STEPS, otsu_threshold, working_size

MIN_SAMPLES = 10  # each of GrabCut's two colour models is a 5-component GMM fitted by k-means


def grabcut_seeds(mask: np.ndarray, source_map: np.ndarray, sure_above: float, sure_below: float) -> np.ndarray:
    """OpenCV GrabCut labels: the mask as probable object/background; the map's extremes as certain."""
    level = otsu_threshold(source_map)
    seeds = np.where(mask, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    seeds[source_map >= level + sure_above] = cv2.GC_FGD
    seeds[source_map <= max(level - sure_below, 0.0)] = cv2.GC_BGD
    return seeds


@MASK_STEPS.register("grabcut")
def grabcut(mask: np.ndarray, image: Optional[np.ndarray] = None, source_map: Optional[np.ndarray] = None,
            sure_above: float = 0.3, sure_below: float = 0.15, iterations: int = 5, max_side: int = 256,
            **_) -> np.ndarray:
    """Refine `mask` with GrabCut; certain object where the source map is `sure_above` over its Otsu
    level, certain background where it is `sure_below` under it. With too few pixels on either side to
    fit the colour models, the mask comes back as it was."""
    if image is None or source_map is None:
        raise ConfigError("refinement 'grabcut' needs the image and the source map (use it in a pseudo-mask "
                          "variant, after the threshold)")
    mask = mask.astype(bool)
    height, width = mask.shape
    size, _ = working_size(height, width, max_side)
    small_image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    small_map = cv2.resize(source_map.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    small_mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    seeds = grabcut_seeds(small_mask, small_map, sure_above, sure_below)
    object_pixels = int(np.isin(seeds, (cv2.GC_FGD, cv2.GC_PR_FGD)).sum())
    if min(object_pixels, seeds.size - object_pixels) < MIN_SAMPLES:  # each colour model needs samples
        return mask
    background_model, object_model = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    # OpenCV's GrabCut takes an 8-bit, 3-channel BGR image; images here are RGB.
    bgr = np.ascontiguousarray(small_image[..., ::-1], np.uint8)
    # GrabCut starts its colour models with k-means from OpenCV's RNG: seeded here, each image's cut no longer
    # depends on what ran before it in the process (resumes, shards and fresh runs make the same labels).
    cv2.setRNGSeed(0)
    cv2.grabCut(bgr, seeds, None, background_model, object_model, int(iterations), cv2.GC_INIT_WITH_MASK)
    refined = np.isin(seeds, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8)
    return cv2.resize(refined, (width, height), interpolation=cv2.INTER_NEAREST) > 0


grabcut.uses_image = True
grabcut.uses_source_map = True
