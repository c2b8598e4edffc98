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


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def header_only_png(width: int, height: int, pixels: bytes = b"") -> bytes:
    """A PNG whose header declares ``width`` x ``height`` 8-bit RGB pixels and whose data is ``pixels`` (a
    compressed IDAT stream): a decompression bomb's header, or, with garbage ``pixels``, a file whose header
    reads and whose pixels do not."""
    import struct

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels)
            + _png_chunk(b"IEND", b""))


def write_every_mode(folder: Path, index: int, size: tuple[int, int] = (40, 36)) -> list[str]:
    """The same class-coloured picture saved as grayscale and CMYK JPEG, RGBA, palette, 8-bit, 16-bit and 1-bit
    PNG, palette GIF, 16-bit TIFF and a PNG named .JPEG: the kinds of file an ImageFolder tree from the wild holds
    (ImageNet itself has CMYK JPEGs and a PNG named .JPEG). Returns the file names."""
    from PIL import Image

    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 96, (size[1], size[0], 3), dtype=np.uint8)
    pixels[..., index % 3] += np.uint8(60 + 40 * index)
    picture = Image.fromarray(pixels)
    wide = pixels[..., index % 3].astype(np.uint16) * 257  # 16 bits: a 0..255 value v is v * 257
    folder.mkdir(parents=True, exist_ok=True)
    files = {"gray.JPEG": picture.convert("L"), "cmyk.JPEG": picture.convert("CMYK"),
             "rgba.png": picture.convert("RGBA"), "palette.png": picture.convert("P"),
             "palette.gif": picture.convert("P"), "onebit.png": picture.convert("1"),
             "wide.png": Image.fromarray(wide), "wide.tif": Image.fromarray(wide),
             "channel.png": Image.fromarray(pixels[..., index % 3]),  # the 16-bit files' values in 8 bits
             "png_named.JPEG": picture}
    for name, image in files.items():
        image.save(folder / name, format="PNG" if name == "png_named.JPEG" else None)
    return sorted(files)


def tree_state(root: Path) -> dict[str, str]:
    """Every entry under ``root`` without following links: a file by its SHA-256, a link by its target, other
    entries (folders, pipes, sockets) by kind. A refused command must leave it identical."""
    import hashlib
    import os
    import stat

    state = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                state[path] = "-> " + os.readlink(path)
            elif stat.S_ISREG(mode):
                state[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            else:
                state[path] = stat.filemode(mode)
    return state
