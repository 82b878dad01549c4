"""Dataset registry: `create_dataset(config, data_root)`, `list_datasets()`, and `DatasetCatalog`, the one
place a run builds its datasets."""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Union

from wsseg._registry import Registry
from wsseg.config_schema import DatasetConfig
from wsseg.data.base import Record, SegmentationDataset
from wsseg.data.class_folders import ClassFolders
from wsseg.data.kvasir import KvasirSeg
from wsseg.data.oxford_pets import OxfordPets
from wsseg.data.synthetic import SyntheticScenes
from wsseg.errors import ConfigError, DataError

DATASETS: Registry = Registry("dataset")
for _cls in (KvasirSeg, ClassFolders, OxfordPets, SyntheticScenes):
    DATASETS.register(_cls.name)(_cls)

DATA_ROOT_ENV = "WSSEG_DATA"
log = logging.getLogger("wsseg")


def list_datasets():
    return DATASETS.names()


def resolve_data_root(data_root: Optional[Union[str, Path]] = None) -> Path:
    """--data-root wins, then $WSSEG_DATA, then ./data."""
    return Path(data_root or os.environ.get(DATA_ROOT_ENV) or "data").expanduser()


def create_dataset(config: DatasetConfig, data_root: Optional[Union[str, Path]] = None,
                   key: str = "dataset", on_bad_image: str = "error",
                   bad_images: Optional[Dict[str, List[str]]] = None) -> SegmentationDataset:
    """Build a registered dataset; a relative `root` is read below the data root.

    `on_bad_image="skip"` decodes every image (and mask) once up front and drops those that fail, each
    with a warning; the reasons are collected in `bad_images[key]`. With "error" (default) the first bad
    file stops the run with a message naming it.
    """
    cls = DATASETS.get(config.name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "root", "split"}
    unknown = sorted(set(config.options) - accepted)
    if unknown:
        raise ConfigError([f"{key}.options.{k}: unknown option for dataset '{config.name}' "
                           f"(valid: {', '.join(sorted(accepted))})" for k in unknown])
    root = None
    if config.root is not None:
        root = Path(config.root).expanduser()
        if not root.is_absolute():
            root = resolve_data_root(data_root) / root
    elif config.name != "synthetic":
        raise ConfigError(f"{key}.root: dataset '{config.name}' needs a root folder")
    dataset = cls(root, config.split, **config.options).subset(config.limit)
    if on_bad_image == "skip":
        dataset = drop_bad_images(dataset, key, bad_images)
    elif on_bad_image != "error":
        raise ConfigError(f"on_bad_image: must be error or skip, got '{on_bad_image}'")
    return dataset


def drop_bad_images(dataset: SegmentationDataset, key: str,
                    bad_images: Optional[Dict[str, List[str]]] = None) -> SegmentationDataset:
    """Keep the records whose image (and mask) decode and agree in size; warn about each dropped one."""
    good, bad = [], []
    for i, record in enumerate(dataset.records):
        try:
            dataset.load_image(i)
            dataset.load_mask(i)
            good.append(record)
        except DataError as exc:
            bad.append(str(exc))
            log.warning("%s: skipping bad image: %s", key, exc)
    if bad:
        if bad_images is not None:
            bad_images.setdefault(key, []).extend(bad)
        log.warning("%s: skipped %d of %d images (on_bad_image: skip)", key, len(bad), len(dataset.records))
        if not good:
            raise DataError(f"{key}: every image is unreadable ({bad[0]})")
        dataset.records = good
    return dataset


class DatasetCatalog:
    """Every dataset of a run, each built once with the run's `on_bad_image` and handed to the stage that
    reads it (classifier, CCAM, maps, calibration, U-Net, INT8 calibration). With `skip`, the files each one
    dropped are in `skipped` under the recipe key that named it (`classifier.train.0`, `segment.train.1`, ...)."""

    def __init__(self, data_root: Optional[Union[str, Path]] = None, on_bad_image: str = "error",
                 image_cache=None):
        self.data_root = data_root
        self.on_bad_image = on_bad_image
        self.image_cache = image_cache  # an ImageCache every dataset built here decodes through, or None
        self.skipped: Dict[str, List[str]] = {}
        self._built: Dict[tuple, SegmentationDataset] = {}

    def get(self, config: DatasetConfig, key: str) -> SegmentationDataset:
        """The dataset `config` describes; `key` is its place in the recipe, used in messages and `skipped`."""
        import dataclasses
        import json

        identity = (key, json.dumps(dataclasses.asdict(config), sort_keys=True, default=str))
        if identity not in self._built:
            dataset = create_dataset(config, self.data_root, key, self.on_bad_image, self.skipped)
            dataset.image_cache = self.image_cache
            self._built[identity] = dataset
        return self._built[identity]

    def concat(self, configs: List[DatasetConfig], key: str) -> SegmentationDataset:
        """Several datasets of one recipe list (`key.0`, `key.1`, ...) read as one."""
        from wsseg.data.base import concat_datasets

        if not configs:
            raise DataError(f"{key}: no dataset given")
        return concat_datasets([self.get(c, f"{key}.{i}") for i, c in enumerate(configs)])


__all__ = ["DATASETS", "DataError", "DatasetCatalog", "Record", "SegmentationDataset", "create_dataset",
           "list_datasets", "resolve_data_root"]
