"""A generated ImageFolder tree (train/<wnid>/, val/<wnid>/ JPEGs) and a test list in RobustBench's format."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

# ImageNet wnids that are not the first classes of RobustBench's map, so that imagenet's labels (the map's)
# and imagefolder's (the sorted folders') differ
_MAP = json.loads((resources.files("robustbench") / "helper_files" / "imagenet_class_to_id_map.json").read_text())
WNIDS = sorted(_MAP)[3::97][:10]


def imagenet_label(wnid: str) -> int:
    return _MAP[wnid]


def make_tree(root: Path, classes: int = 10, train_per_class: int = 16, val_per_class: int = 4,
              size: tuple[int, int] = (64, 64), listed: int = 12) -> Path:
    """JPEGs whose mean colour depends on the class (learnable), and ``root/test_list.txt``: ``listed`` val
    images in a shuffled order, one "<wnid>/<file>" per line (RobustBench's format). Returns the list's path."""
    from PIL import Image

    rng = np.random.default_rng(0)
    val_names = []
    for index, wnid in enumerate(WNIDS[:classes]):
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                pixels = rng.integers(0, 96, (size[1], size[0], 3), dtype=np.uint8)
                pixels[..., index % 3] += np.uint8(16 * index + 60)
                name = f"{split}_{index:02d}_{k:03d}.JPEG"
                Image.fromarray(pixels).save(folder / name, quality=90)
                if split == "val":
                    val_names.append(f"{wnid}/{name}")
    order = rng.permutation(len(val_names))[:listed]
    path = root / "test_list.txt"
    path.write_text("".join(f"{val_names[i]}\n" for i in order))
    return path
