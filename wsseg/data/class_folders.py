"""Image-level labels from folder names: root/<split>/<class>/*.jpg or root/<class>/*.jpg."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from wsseg.data.base import Record, SegmentationDataset, list_images, require_dir
from wsseg.errors import DataError


class ClassFolders(SegmentationDataset):
    """With `positive` set, labels are binary (that folder = 1, every other folder = 0); otherwise one
    label per folder in sorted order. CP-CHILD uses this layout with `positive: Polyp`. `folders` keeps only
    the named class folders (for example `[Non-Polyp]`: negatives only, as empty masks for the U-Net)."""

    name = "class_folders"

    def __init__(self, root: Path, split: Optional[str] = None, positive: Optional[str] = None,
                 folders: Optional[List[str]] = None):
        self.root = require_dir(root, "class_folders")
        self.split = split
        base = require_dir(self.root / split, f"class_folders split '{split}'") if split else self.root
        class_dirs = sorted(p for p in base.iterdir() if p.is_dir())
        if not class_dirs:
            raise DataError(f"class_folders: no class folders in {base}")
        names = [p.name for p in class_dirs]
        if positive is not None:
            if positive not in names:
                raise DataError(f"class_folders: positive class '{positive}' is not a folder of {base} (found {names})")
            classes = [f"not {positive}", positive]
        else:
            classes = names
        kept = class_dirs
        if folders is not None:
            missing = sorted(set(folders) - set(names))
            if missing:
                raise DataError(f"class_folders: folders {missing} are not class folders of {base} (found {names})")
            kept = [d for d in class_dirs if d.name in folders]
        files = [(d, p) for d in kept for p in list_images(d)]
        stem_count = {}
        for _, p in files:
            stem_count[p.stem] = stem_count.get(p.stem, 0) + 1
        records = []
        for d, p in files:
            label = int(d.name == positive) if positive is not None else names.index(d.name)
            # Prefix the class only where two folders share a file stem, so outputs stay unique.
            stem = p.stem if stem_count[p.stem] == 1 else f"{d.name}__{p.stem}"
            records.append(Record(stem, p, label, None))
        super().__init__(records, classes, positive_index=1 if positive is not None else len(classes) - 1)

    def describe(self) -> str:
        return f"class_folders at {self.root}, split {self.split}"
