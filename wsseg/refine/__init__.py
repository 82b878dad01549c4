"""Refinement steps for maps and masks, each registered by name and configured from the recipe.

Map steps see the float map (H x W in [0, 1], at the image's size) and the image; mask steps see
the thresholded mask, and those that declare `uses_image` / `uses_source_map` also the image and the
unrefined source map. Order: map steps -> threshold -> mask steps.
"""

from __future__ import annotations

import inspect
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from wsseg._registry import Registry
from wsseg.errors import ConfigError

MAP_STEPS: Registry = Registry("map refinement")
MASK_STEPS: Registry = Registry("mask refinement")


def _normalise(x: np.ndarray) -> np.ndarray:
    low, high = float(x.min()), float(x.max())
    return (x - low) / (high - low) if high > low else np.zeros_like(x)


@MAP_STEPS.register("guided_filter")
def guided_filter(activation: np.ndarray, image: np.ndarray, radius: int = 8, eps: float = 1e-3,
                  **_) -> np.ndarray:
    """He et al.'s guided filter with the grayscale image as guide: map edges snap to image edges."""
    guide = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    p = activation.astype(np.float32)
    size = (2 * radius + 1, 2 * radius + 1)
    mean_i, mean_p = cv2.boxFilter(guide, -1, size), cv2.boxFilter(p, -1, size)
    cov_ip = cv2.boxFilter(guide * p, -1, size) - mean_i * mean_p
    var_i = cv2.boxFilter(guide * guide, -1, size) - mean_i * mean_i
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    return _normalise(cv2.boxFilter(a, -1, size) * guide + cv2.boxFilter(b, -1, size))


guided_filter.uses_image = True


@MAP_STEPS.register("bilateral")
def bilateral(activation: np.ndarray, image: np.ndarray, diameter: int = 9, sigma_colour: float = 0.1,
              sigma_space: float = 15.0, **_) -> np.ndarray:
    """Approximately joint bilateral smoothing: OpenCV's 3-channel filter on (gray, gray, scaled map), so
    the range weights come mostly from image intensity and the map is averaged within image regions."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    scale = 0.1  # keeps the map's own differences small against the image's
    stack = np.stack([gray, gray, activation.astype(np.float32) * scale], axis=2)
    smoothed = cv2.bilateralFilter(stack, diameter, sigma_colour, sigma_space)
    return _normalise(smoothed[..., 2] / scale)


bilateral.uses_image = True


@MAP_STEPS.register("gate")
def gate(activation: np.ndarray, image: np.ndarray, other: Optional[np.ndarray] = None, power: float = 1.0,
         **_) -> np.ndarray:
    """Multiply by another method's map (e.g. CCAM gated by the classifier's Grad-CAM)."""
    if other is None:
        raise ConfigError("refinement 'gate' needs `other:` naming another map method")
    return _normalise(activation * np.power(np.clip(other, 0, 1), power))


@MAP_STEPS.register("mean")
def mean(activation: np.ndarray, image: np.ndarray, other: Optional[np.ndarray] = None, weight: float = 0.5,
         **_) -> np.ndarray:
    """Weighted average with another method's map."""
    if other is None:
        raise ConfigError("refinement 'mean' needs `other:` naming another map method")
    return _normalise((1 - weight) * activation + weight * other)


@MASK_STEPS.register("largest_component")
def largest_component(mask: np.ndarray, **_) -> np.ndarray:
    """Keep the biggest connected region: one object per image (Kvasir-SEG, pets)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 2:
        return mask.astype(bool)
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == biggest


@MASK_STEPS.register("fill_holes")
def fill_holes(mask: np.ndarray, **_) -> np.ndarray:
    """Fill regions enclosed by the mask (flood fill from the border)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 1)
    holes = flood == 0
    return (padded.astype(bool) | holes)[1:-1, 1:-1]


def working_size(height: int, width: int, max_side: int) -> Tuple[Tuple[int, int], float]:
    """(width, height) for cv2.resize with the longer side at most `max_side`, and the scale (<= 1)."""
    scale = min(1.0, max_side / max(height, width))
    return (max(1, round(width * scale)), max(1, round(height * scale))), scale


def otsu_threshold(activation: np.ndarray) -> float:
    """Per-image Otsu threshold of a [0, 1] map."""
    value, _ = cv2.threshold((activation * 255).astype(np.uint8), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(value) / 255.0


def validate_steps(steps, key: str = "pseudo_masks.refine") -> List[str]:
    problems = []
    for i, step in enumerate(steps):
        registry = MAP_STEPS if step.name in MAP_STEPS else MASK_STEPS if step.name in MASK_STEPS else None
        if registry is None:
            problems.append(f"{key}.{i}.name: unknown refinement '{step.name}' "
                            f"(valid: {', '.join(MAP_STEPS.names() + MASK_STEPS.names())})")
            continue
        requires = getattr(registry.get(step.name), "requires", None)
        if requires is not None and not requires[2]():
            problems.append(f"{key}.{i}.name: refinement '{step.name}' needs the {requires[0]} package: {requires[1]}")
        accepted = set(inspect.signature(registry.get(step.name)).parameters) - {"activation", "image", "mask",
                                                                                    "other", "source_map", "_"}
        for option in step.options:
            if option not in accepted:
                problems.append(f"{key}.{i}.options.{option}: unknown option for '{step.name}' "
                                f"(valid: {', '.join(sorted(accepted)) or 'none'})")
    return problems


def refine_map(activation: np.ndarray, image: Optional[np.ndarray], steps,
               others: Optional[Dict[str, np.ndarray]] = None) -> np.ndarray:
    """Apply the map steps in order (steps are objects with name, options and other)."""
    for step in steps:
        if step.name in MAP_STEPS:
            other = (others or {}).get(step.other) if step.other else None
            activation = MAP_STEPS.get(step.name)(activation, image, other=other, **step.options)
    return activation


def threshold_and_clean(activation: np.ndarray, steps, threshold: float, threshold_mode: str = "fixed",
                        image: Optional[np.ndarray] = None, source_map: Optional[np.ndarray] = None) -> np.ndarray:
    """The threshold (`fixed` value or per-image `otsu`), then the mask steps in order (those that use
    them get `image` and the unrefined `source_map`)."""
    if threshold_mode == "otsu":  # OpenCV's Otsu value is the last background level: foreground is above it
        level = round(otsu_threshold(activation) * 255)
        mask = (activation * 255).astype(np.uint8) > level  # compare on the 8-bit levels Otsu saw
    else:
        mask = activation >= threshold
    for step in steps:
        if step.name in MASK_STEPS:
            mask = MASK_STEPS.get(step.name)(mask, image=image, source_map=source_map, **step.options)
    return mask


def _step_function(step):
    return MAP_STEPS.get(step.name) if step.name in MAP_STEPS else MASK_STEPS.get(step.name)


def needs_image(steps) -> bool:
    return any(getattr(_step_function(s), "uses_image", False) for s in steps)


def needs_source_map(steps) -> bool:
    return any(getattr(_step_function(s), "uses_source_map", False) for s in steps)


def list_refinements() -> List[str]:
    return MAP_STEPS.names() + MASK_STEPS.names()



from wsseg.refine import crf as _crf  # noqa: E402,F401  (registers dense_crf)
from wsseg.refine import grabcut as _grabcut  # noqa: E402,F401  (registers grabcut)
