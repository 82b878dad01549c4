"""Dense CRF (Kraehenbuehl and Koltun, 2011) over a map: foreground snaps to colour edges.

Needs the optional `pydensecrf2` package (`pip install "wsseg[crf]"`). Inference runs on a copy of
the image scaled to `max_side` (the CRF costs O(pixels) per iteration and polyp or pet edges survive
the downscale); the foreground probability is scaled back to the image's size.
"""

from __future__ import annotations

import cv2
import numpy as np

from wsseg.errors import ConfigError
from wsseg.refine import MAP_STEPS, otsu_threshold, working_size


def crf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def map_to_probability(activation: np.ndarray, center: str = "otsu", sharpness: float = 8.0,
                       offset: float = 0.0) -> np.ndarray:
    """Foreground probability for the CRF's unary term. `center: otsu` puts 0.5 at the image's Otsu level
    plus `offset` (a raw min-max map would hand the CRF far too little foreground; a positive offset
    hands it less); `none` uses the map as it is."""
    if center == "otsu":
        return 1.0 / (1.0 + np.exp(-sharpness * (activation - otsu_threshold(activation) - offset)))
    if center == "none":
        return activation
    raise ConfigError(f"dense_crf.center: unknown value '{center}' (valid: otsu, none)")


@MAP_STEPS.register("dense_crf")
def dense_crf(activation: np.ndarray, image: np.ndarray, center: str = "otsu", sharpness: float = 8.0,
              spatial_sigma: float = 50.0, colour_sigma: float = 13.0, bilateral_weight: float = 10.0,
              smoothness_sigma: float = 3.0, smoothness_weight: float = 3.0, iterations: int = 5,
              max_side: int = 320, offset: float = 0.0, **_) -> np.ndarray:
    """Mean-field inference of a two-label dense CRF; returns the foreground marginal (threshold it at 0.5).

    `offset` moves the unary's 0.5 above (positive) or below the Otsu level of the map: the CRF grows
    foreground along colour edges, so maps whose Otsu masks already run large come out tighter with it.
    """
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as exc:
        raise ConfigError("refinement 'dense_crf' needs the pydensecrf2 package: pip install \"wsseg[crf]\"") from exc
    height, width = activation.shape
    size, scale = working_size(height, width, max_side)
    small_image = cv2.resize(image, size, interpolation=cv2.INTER_AREA) if scale < 1 else image
    # pydensecrf keeps a pointer to a writable, C-ordered uint8 buffer; images decoded by PIL are read-only
    small_image = np.require(small_image, np.uint8, ["C_CONTIGUOUS", "WRITEABLE", "OWNDATA"])
    small_map = cv2.resize(activation.astype(np.float32), size, interpolation=cv2.INTER_LINEAR) if scale < 1 \
        else activation.astype(np.float32)
    probability = np.clip(map_to_probability(small_map, center, sharpness, offset), 1e-3, 1 - 1e-3).astype(np.float32)
    crf = dcrf.DenseCRF2D(size[0], size[1], 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.stack([1 - probability, probability]))))
    crf.addPairwiseGaussian(sxy=smoothness_sigma, compat=smoothness_weight)
    crf.addPairwiseBilateral(sxy=spatial_sigma, srgb=colour_sigma, rgbim=small_image,
                             compat=bilateral_weight)
    foreground = np.asarray(crf.inference(int(iterations)), np.float32).reshape(2, size[1], size[0])[1]
    return cv2.resize(foreground, (width, height), interpolation=cv2.INTER_LINEAR) if scale < 1 else foreground


dense_crf.uses_image = True
dense_crf.requires = ("pydensecrf", "pip install \"wsseg[crf]\"", crf_available)
