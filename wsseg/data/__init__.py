"""Dataset registry: `create_dataset(config, data_root)` and `list_datasets()`."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Optional, Union

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


def list_datasets():
    return DATASETS.names()


def resolve_data_root(data_root: Optional[Union[str, Path]] = None) -> Path:
    """--data-root wins, then $WSSEG_DATA, then ./data."""
    return Path(data_root or os.environ.get(DATA_ROOT_ENV) or "data").expanduser()


def create_dataset(config: DatasetConfig, data_root: Optional[Union[str, Path]] = None,
                   key: str = "dataset") -> SegmentationDataset:
    """Build a registered dataset; a relative `root` is read below the data root."""
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
    dataset = cls(root, config.split, **config.options)
    return dataset.subset(config.limit)


__all__ = ["DATASETS", "DataError", "Record", "SegmentationDataset", "create_dataset", "list_datasets",
           "resolve_data_root"]
