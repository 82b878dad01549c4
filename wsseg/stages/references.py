"""Blind mask producers that look at no image content: the floor a map method must clear."""

from __future__ import annotations

import math

import numpy as np

from wsseg._registry import Registry

REFERENCE_PRODUCERS: Registry = Registry("reference producer")
ELLIPSE_AREA_FRACTION = 0.30


@REFERENCE_PRODUCERS.register("all_foreground")
def all_foreground(height: int, width: int) -> np.ndarray:
    return np.ones((height, width), dtype=bool)


@REFERENCE_PRODUCERS.register("center_ellipse")
def center_ellipse(height: int, width: int) -> np.ndarray:
    """A centred ellipse with the image's aspect ratio covering 30% of its area."""
    scale = math.sqrt(4 * ELLIPSE_AREA_FRACTION / math.pi)  # pi * (s w/2)(s h/2) = 0.3 w h
    yy, xx = np.mgrid[0:height, 0:width]
    ry, rx = scale * height / 2, scale * width / 2
    return ((yy + 0.5 - height / 2) / ry) ** 2 + ((xx + 0.5 - width / 2) / rx) ** 2 <= 1.0


def list_reference_producers():
    return REFERENCE_PRODUCERS.names()
