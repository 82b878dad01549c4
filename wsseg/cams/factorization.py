"""Deep feature factorisation across images: the concept that recurs in a whole image set, as a map."""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

from wsseg.cams.base import MapMethod, resolve_target_layer

log = logging.getLogger("wsseg")


#: Best and second-best agreement with EigenCAM closer than this: the concept choice is a coin toss.
AMBIGUOUS_AGREEMENT = 0.1


class FeatureFactorization(MapMethod):
    """Deep feature factorisation (Collins et al., ECCV 2018) fitted over a set of images, one concept kept.

    Non-negative matrix factorisation splits the last features of all fit images into `n_concepts`
    parts shared by the whole set; an image's map is its activation of one of them. The concept kept
    is the one whose maps agree best (mean correlation) with the sign-corrected EigenCAM of the same
    images, so no label or mask chooses it. EigenCAM takes each image's own main component; fitted
    across images, the factorisation keeps what recurs in every image (the object the set is about)
    and leaves each image's own distractors (glare, borders, folds) to the other concepts.

    Call `fit` with batches of the images to be mapped (or a sample of them) first; without it, the
    first batch given to `compute` is the fit set.
    """

    needs_fit = True

    def __init__(self, model: torch.nn.Module, target_layer: str = "auto", n_concepts: int = 3,
                 max_iter: int = 400, seed: int = 0):
        if n_concepts < 2:
            raise ValueError(f"n_concepts must be at least 2 (got {n_concepts}): one concept is the whole image")
        self.layer_name, layer = resolve_target_layer(model, target_layer)
        self.model = model
        self.n_concepts, self.max_iter, self.seed = n_concepts, max_iter, seed
        self._captured: list = []
        self._hook = layer.register_forward_hook(lambda mod, inp, out: self._captured.append(out))
        self.nmf = None
        self.offset: Optional[np.ndarray] = None
        self.concept: Optional[int] = None
        self.concept_agreement: Optional[np.ndarray] = None  # mean correlation of each concept with EigenCAM

    def features(self, images: torch.Tensor) -> np.ndarray:
        """Activations of the target layer, (B, C, h, w) float32."""
        self._captured.clear()
        with torch.no_grad():
            self.model(images)
        out = self._captured[-1]
        self._captured.clear()
        return out.detach().float().cpu().numpy()

    def _patches(self, features: np.ndarray) -> np.ndarray:
        """(B*h*w, C) rows, shifted so that they are non-negative (ReLU features are left as they are)."""
        return np.maximum(_rows(features) - self.offset, 0)

    def fit(self, batches: Iterable[torch.Tensor]) -> "FeatureFactorization":
        from sklearn.decomposition import NMF

        features = [self.features(images) for images in batches]
        if not features:
            raise ValueError("FeatureFactorization.fit: no images to fit on")
        features = np.concatenate(features)
        self.offset = np.minimum(_rows(features).min(axis=0), 0)
        self.nmf = NMF(n_components=self.n_concepts, init="nndsvda", max_iter=self.max_iter, random_state=self.seed)
        with _quiet_convergence():
            activations = self.nmf.fit_transform(self._patches(features))
        if self.nmf.n_iter_ >= self.max_iter:
            log.warning("feature factorisation stopped at max_iter=%d before converging; more iterations may "
                        "change the maps", self.max_iter)
        concept_maps = activations.reshape(len(features), -1, self.n_concepts)  # image, position, concept
        eigen = get_2d_projection_with_sign_correction(features).reshape(len(features), -1)
        self.concept_agreement = np.array([_mean_correlation(concept_maps[:, :, c], eigen)
                                           for c in range(self.n_concepts)])
        scores = np.nan_to_num(self.concept_agreement, nan=-2.0)  # a concept with flat maps is never kept
        self.concept = int(np.argmax(scores))
        log.info("feature factorisation: %d images, concept %d of %d kept (agreement with EigenCAM %s)",
                 len(features), self.concept, self.n_concepts, np.round(self.concept_agreement, 3).tolist())
        ranked = np.sort(scores)[::-1]
        if ranked[0] - ranked[1] < AMBIGUOUS_AGREEMENT:
            # Measured on Kvasir-SEG: fitted on the 120 val images (0.69 vs 0.66) the kept concept was
            # far worse than fitted on train images (0.75 vs 0.47).
            log.warning("feature factorisation: two concepts agree with EigenCAM about equally (%.2f vs %.2f), so "
                        "the kept one may not be the object; fit on another or larger image set "
                        "(maps.fit_dataset, e.g. the training images)", ranked[0], ranked[1])
        return self

    def compute(self, images: torch.Tensor, targets: Sequence[int] = ()) -> np.ndarray:
        if self.nmf is None:
            self.fit([images])
        features = self.features(images)
        batch, _, h, w = features.shape
        with _quiet_convergence():
            concept = self.nmf.transform(self._patches(features))[:, self.concept].reshape(batch, 1, h, w)
        maps = F.interpolate(torch.from_numpy(concept.astype(np.float32)), size=images.shape[-2:],
                             mode="bilinear", align_corners=False)[:, 0].numpy()
        peak = maps.reshape(batch, -1).max(axis=1)[:, None, None]
        return np.clip(maps / np.maximum(peak, 1e-8), 0, 1).astype(np.float32)

    def close(self) -> None:
        self._hook.remove()


def _rows(features: np.ndarray) -> np.ndarray:
    """(B, C, h, w) -> (B*h*w, C): one row per position, image by image."""
    return features.transpose(0, 2, 3, 1).reshape(-1, features.shape[1])


def _mean_correlation(maps: np.ndarray, references: np.ndarray) -> float:
    """Mean per-image Pearson correlation of two (images, positions) arrays; flat maps agree with nothing."""
    values = [float(np.corrcoef(a, b)[0, 1]) for a, b in zip(maps, references)
              if a.std() > 1e-12 and b.std() > 1e-12]
    return float(np.mean(values)) if values else float("nan")


@contextlib.contextmanager
def _quiet_convergence():
    """sklearn warns on every call that stops at `max_iter`: once per batch. `fit` says it once instead.
    (On Kvasir-SEG the fit converges in 332 of the 400 iterations, and 2000 give the same maps.)"""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield
