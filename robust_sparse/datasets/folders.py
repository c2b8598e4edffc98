"""Datasets streamed from image files: ImageNet-2012 (``imagenet.py``) and any tree in torchvision's ImageFolder
layout (``imagefolder.py``).

``data.root`` holds ``train/<class>/<image>`` and ``val/<class>/<image>``. Nothing of the training split is held
in memory but its file names: a DataLoader with ``data.workers`` processes decodes and augments each batch
(RandomResizedCrop + horizontal flip) into uint8 tensors, which are pinned, moved to the device and scaled to
[0, 1] there, as the in-memory loader does for CIFAR. Under torchrun a DistributedSampler gives each rank its
shard. Each epoch's order and crops come from ``(seed, epoch)``: a resumed run sees the batches an
uninterrupted one would have seen.

The test split follows RobustBench: for ``imagenet`` its own list of 5000 validation images
(``robustbench/helper_files/imagenet_test_image_ids.txt``), its class indices
(``imagenet_class_to_id_map.json``) and its 'Res256Crop224' preprocessing; its first ``n`` images in the list's
order. The validation split for model selection is a seeded subset of the *training* images, so the test list
is never seen before the final evaluation. What is evaluated (``val.max_examples`` validation images each epoch,
the first ``eval.n_examples`` test images) is small: it is read into uint8 tensors (:func:`in_memory`), exactly
the values RobustBench's float preprocessing gives times 255, and every evaluation path runs on them as on CIFAR.

The tree comes from strangers, so it is read defensively (:func:`read_tree`): a symlink is followed only when it
stays inside its split's folder and only once (a cycle, or a second way to the same image, is refused naming the
link); test-list entries must stay inside their ``val/<class>`` folder; only regular files are opened (a named
pipe would block a reader forever); and every image's header is read before training starts, so that an empty,
truncated, non-image or oversized file is one line naming it rather than a failure hours in. A file that passes
that scan and still fails to decode is the same one-line error when a batch meets it (:class:`ImageFileError`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import posixpath
import stat
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from robust_sparse.datasets.images import ImageSet
from robust_sparse.errors import ConfigError, UserError
from robust_sparse.files.rundir import describe

if TYPE_CHECKING:
    from robust_sparse.datasets.registry import DataSettings

log = logging.getLogger(__name__)

ROBUSTBENCH_PREPROCESSING = "Res256Crop224"  # RobustBench's ImageNet test preprocessing
_TEST_ORDER_SEED = 20240501  # imagefolder without a list: val/ in one fixed order, whatever the run's seed


@dataclass
class FolderSet:
    """Images named by file, with their labels; read (and, for training, augmented) when a batch is drawn."""

    paths: list[str]
    targets: list[int]
    image_size: int

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor(self.targets, dtype=torch.int64)

    @property
    def example_shape(self) -> tuple[int, ...]:
        """One example's (C, H, W) as the model sees it: an RGB crop of ``image_size``."""
        return (3, self.image_size, self.image_size)

    def take(self, index: torch.Tensor | slice) -> "FolderSet":
        if isinstance(index, slice):
            return FolderSet(self.paths[index], self.targets[index], self.image_size)
        chosen = index.tolist()
        return FolderSet([self.paths[i] for i in chosen], [self.targets[i] for i in chosen], self.image_size)


# ----------------------------------------------------------------------------------------------------------
# transforms: PIL image -> uint8 [C, H, W]


def training_transform(size: int, augment: bool) -> Callable:
    """RandomResizedCrop(size) + horizontal flip (the standard ImageNet recipe), or the test preprocessing."""
    import torchvision.transforms as T

    if not augment:
        return test_transform(size)
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.PILToTensor()])


def test_transform(size: int) -> Callable:
    """RobustBench's 'Res256Crop224' (its own transform object) at 224 px; the same proportions otherwise.

    RobustBench's transform ends in ToTensor (uint8 / 255 as float32); we store the uint8 values it came from,
    so that an image costs a quarter of the memory and every path divides by 255 on the device alike."""
    import torchvision.transforms as T

    if size == 224:
        with warnings.catch_warnings():  # robustbench.loaders imports the deprecated pkg_resources
            warnings.simplefilter("ignore")
            from robustbench.data import PREPROCESSINGS
        preprocessing = PREPROCESSINGS[ROBUSTBENCH_PREPROCESSING]
    else:
        preprocessing = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor()])
    return T.Compose([preprocessing, _to_uint8])


def corruptions_transform() -> Callable:
    """RobustBench's ImageNet-C preprocessing: its 'Res224' (``robustbench.eval`` uses only resizing to 224x224
    for the corruptions tracks; ImageNet-C's images are 224 px already), stored as uint8 like the test split."""
    import torchvision.transforms as T

    with warnings.catch_warnings():  # robustbench.loaders imports the deprecated pkg_resources
        warnings.simplefilter("ignore")
        from robustbench.data import PREPROCESSINGS
    return T.Compose([PREPROCESSINGS["Res224"], _to_uint8])


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    return image.mul(255).round_().to(torch.uint8)  # ToTensor's x / 255, back to x exactly


# ----------------------------------------------------------------------------------------------------------
# reading one image


class ImageFileError(UserError):
    """An image file that cannot be used (under ``data.root``, or ImageNet-C's under ``--data-root``); the
    message names it and says why, and no config field: the file is what to fix."""


_SPECIAL_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _kind(mode: int) -> str:
    return next((name for test, name in _SPECIAL_KINDS if test(mode)), "not a regular file")


def _unreadable(path: str, error: BaseException) -> str:
    """One line: the file and Pillow's (or the system's) reason."""
    from PIL import Image

    if isinstance(error, Image.DecompressionBombError):
        reason = f"{error} (Pillow's decompression-bomb limit, PIL.Image.MAX_IMAGE_PIXELS)"
    elif isinstance(error, Image.UnidentifiedImageError):  # its message repeats the path
        reason = "not an image Pillow can read (cannot identify image file)"
    elif isinstance(error, OSError) and error.errno is not None:
        reason = describe(error)
    elif isinstance(error, OSError) and str(error).strip():  # Pillow's own: "image file is truncated (...)"
        reason = str(error).strip().splitlines()[0]
    else:
        text = str(error).strip()
        reason = f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
    return f"image {path} cannot be read: {reason}"


def _open_regular(path: str):
    """``path`` opened for reading if it is a regular file. O_NONBLOCK: opening a named pipe with no writer
    would otherwise block before fstat could refuse it (it changes nothing for a regular file)."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise ImageFileError(f"{path} is {_kind(mode)}, not an image file; only regular files are read")
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def load_rgb(path: str):
    """The image at ``path`` as 8-bit RGB: torchvision's ``pil_loader`` (robustbench.loaders' default_loader is a
    copy of it), except that 16-bit grayscale is scaled to 8 bits, where ``convert("RGB")`` would clip every value
    above 255 to white. Anything wrong with the file is an :class:`ImageFileError` naming it."""
    from PIL import Image

    try:
        with _open_regular(path) as handle, Image.open(handle) as image:
            if image.mode in _SIXTEEN_BIT:  # Pillow opens 16-bit grayscale PNG/TIFF as I;16 (older ones as I)
                import numpy as np

                values = np.asarray(image).astype(np.int64)
                return Image.fromarray((values.clip(0, 65535) >> 8).astype(np.uint8)).convert("RGB")
            return image.convert("RGB")
    except ImageFileError:
        raise
    except Exception as error:  # Pillow's decoders raise many types on bad data (OSError, SyntaxError, ...)
        raise ImageFileError(_unreadable(path, error)) from None


def check_header(path: str) -> None:
    """Reads ``path``'s header only (format, size; Pillow checks its decompression-bomb limit there), which is
    fast enough for ImageNet's 1.28M files where a full decode is not. A JPEG that does not end in its EOI marker
    is truncated (or carries trailing bytes): that one alone is decoded, to tell which."""
    from PIL import Image

    try:
        with _open_regular(path) as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                raise ImageFileError(f"image {path} cannot be read: the file is empty (0 bytes)")
            with Image.open(handle) as image:
                if image.format == "JPEG":
                    handle.seek(-2, os.SEEK_END)
                    if handle.read(2) != b"\xff\xd9":
                        handle.seek(0)
                        with Image.open(handle) as whole:
                            whole.load()
    except ImageFileError:
        raise
    except Exception as error:  # as in load_rgb
        raise ImageFileError(_unreadable(path, error)) from None


class _Unreadable:
    """What a worker returns for an image it cannot read: raised in the loop's own process as one line, where an
    exception raised in a worker would come back with the worker's traceback in its message."""

    def __init__(self, message: str) -> None:
        self.message = message


def _collate(batch: list):
    from torch.utils.data import default_collate

    for item in batch:
        if isinstance(item, _Unreadable):
            return item
    return default_collate(batch)


def _batches(loader) -> Iterator:
    for batch in loader:
        if isinstance(batch, _Unreadable):
            raise ImageFileError(f"{batch.message} (met while loading a batch; replace the file and resume the run)")
        yield batch


class _Files(torch.utils.data.Dataset):
    def __init__(self, data: FolderSet, transform: Callable) -> None:
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> "tuple[torch.Tensor, int] | _Unreadable":
        try:
            image = load_rgb(self.data.paths[index])
        except ImageFileError as error:
            return _Unreadable(str(error))
        return self.transform(image), self.data.targets[index]


# ----------------------------------------------------------------------------------------------------------
# loading


class FolderLoader:
    """Iterates over a :class:`FolderSet` in batches of float [0,1] images on ``device``: the streamed
    counterpart of :class:`robust_sparse.datasets.images.BatchLoader`, with the same arguments and behaviour."""

    def __init__(self, data: FolderSet, batch_size: int, device: torch.device, *, shuffle: bool = False,
                 seed: int = 0, info=None, augment_batches: bool = False, drop_last: bool = False, rank: int = 0,
                 world_size: int = 1, workers: int = 0) -> None:
        from torch.utils.data.distributed import DistributedSampler

        self.data, self.batch_size, self.device = data, batch_size, device
        self.seed, self.drop_last, self.workers = seed, drop_last, workers
        self.dataset = _Files(data, training_transform(data.image_size, augment_batches and info is not None))
        # every rank draws the same permutation of seed + epoch and keeps its own equal-sized slice
        self.sampler = DistributedSampler(self.dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                          seed=seed, drop_last=True)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Workers are started afresh each epoch from a generator of (seed, epoch): their crops do not depend on
        # the epochs before, so a resumed run augments as an uninterrupted one.
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self.sampler, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", drop_last=self.drop_last, collate_fn=_collate,
            generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        for images, labels in _batches(loader):
            yield (images.to(self.device, non_blocking=True).float().div_(255),
                   labels.to(self.device, non_blocking=True))


def in_memory(data: FolderSet, workers: int = 0, batch_size: int = 64, transform: Callable | None = None):
    """``data`` read in order through the test preprocessing (or ``transform``, PIL -> uint8 [C, H, W]), as an
    in-memory uint8 ImageSet."""
    if len(data) == 0:
        return ImageSet(torch.zeros(0, 3, data.image_size, data.image_size, dtype=torch.uint8),
                        torch.zeros(0, dtype=torch.int64))
    transform = transform or test_transform(data.image_size)
    loader = torch.utils.data.DataLoader(_Files(data, transform), batch_size=batch_size, collate_fn=_collate,
                                         num_workers=min(workers, max(1, len(data) // batch_size)))
    images, labels = zip(*_batches(loader))
    return ImageSet(torch.cat(images), torch.cat(labels))


# ----------------------------------------------------------------------------------------------------------
# the tree


def _robustbench_file(name: str) -> Path:
    with warnings.catch_warnings():  # importing robustbench imports the deprecated pkg_resources
        warnings.simplefilter("ignore")
        return Path(str(resources.files("robustbench") / "helper_files" / name))


def imagenet_classes() -> dict[str, int]:
    """wnid -> class index, RobustBench's map (the standard ImageNet-2012 order)."""
    return json.loads(_robustbench_file("imagenet_class_to_id_map.json").read_text())


def robustbench_test_list() -> Path:
    """RobustBench's list of its 5000 ImageNet test images, ``<wnid>/<file>`` per line."""
    return _robustbench_file("imagenet_test_image_ids.txt")


_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def _class_folders(folder: Path) -> list[str]:
    try:
        return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    except OSError as error:
        raise UserError(f"data.root: cannot read the folder {folder}: {describe(error)}") from None


def _classes(settings: "DataSettings", train_dir: Path, known: dict[str, int] | None) -> dict[str, int]:
    """Class folder -> label: ``known`` (imagenet: RobustBench's map) when given, the sorted folders (ImageFolder's)
    otherwise."""
    folders = _class_folders(train_dir)
    if not folders:
        raise UserError(f"data.root: {train_dir} has no class folders (expected train/<class>/<image>)")
    if known is not None:
        unknown = [name for name in folders if name not in known]
        if unknown:
            raise UserError(f"data.root: {train_dir} has folders that are no ImageNet-2012 class (wnid), e.g. "
                            f"{', '.join(unknown[:3])}; use data.dataset = imagefolder for another dataset")
        return known
    if len(folders) != settings.num_classes:
        raise ConfigError(f"data.num_classes = {settings.num_classes}: {train_dir} has {len(folders)} class folders")
    return {name: index for index, name in enumerate(folders)}


def _inside(real: str, boundary: str) -> bool:
    return real == boundary or real.startswith(boundary.rstrip(os.sep) + os.sep)


class _Walk:
    """One split's folders, walked as ``os.walk(followlinks=True)`` would list them (so the files come in
    torchvision's ImageFolder order) but following a symlink only when it resolves inside the split's folder and
    reading each folder and image once: a link back to an ancestor would otherwise be walked until the path is
    too long (a tree of 24 images read as 1,304), and a link to another class's folder or image would give its
    images a second label."""

    def __init__(self, split: Path) -> None:
        self.split = split
        self.boundary = os.path.realpath(split)
        self.folders: dict[str, tuple[str, str | None]] = {}  # real folder -> (its path as walked, the link on it)
        self.linked_files: list[tuple[str, str]] = []  # (link, real file) for every link to an image
        self.listing: list[tuple[str, list[str]]] = []  # (folder as walked, its image files' names)

    def images(self, class_dir: str) -> list[str]:
        """The image files under ``class_dir``, in the order of ``sorted(os.walk(...))`` (torchvision's)."""
        self.listing = []
        self.folder(class_dir, class_dir if os.path.islink(class_dir) else None)
        return [os.path.join(directory, name) for directory, names in sorted(self.listing) for name in names]

    def _refuse_outside(self, link: str, real: str) -> None:
        if not _inside(real, self.boundary):
            raise UserError(f"data.root: symlink {link} leads to {real}, outside {self.split}; links are followed "
                            f"only within their split's folder")

    def _twice(self, link: str, real: str, other: str) -> UserError:
        return UserError(f"data.root: symlink {link} leads to {real}, also read as {other}: a link cycle or a second "
                         "way to the same images (each folder and image is read once)")

    def folder(self, path: str, link: str | None = None) -> None:
        real = os.path.realpath(path)
        if link == path:  # a class folder that is itself a link
            self._refuse_outside(path, real)
        if real == self.boundary:  # a link back to the split's folder, which holds every class
            raise self._twice(link or path, real, str(self.split))
        if real in self.folders:
            first, first_link = self.folders[real]
            if first_link is not None and link is None:  # the link came first: name it, and this folder
                raise self._twice(first_link, real, path)
            raise self._twice(link or path, real, first)
        self.folders[real] = (path, link)
        try:
            entries = sorted(os.scandir(path), key=lambda entry: entry.name)  # names in order, as torchvision
        except OSError as error:
            raise UserError(f"data.root: cannot read the folder {path}: {describe(error)}") from None
        names: list[str] = []
        for entry in entries:
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                self._refuse_outside(entry.path, target)
                try:
                    mode = os.stat(entry.path).st_mode
                except OSError as error:  # dangling, or a cycle of links (ELOOP)
                    if not entry.name.lower().endswith(_IMAGE_EXTENSIONS) and error.errno != errno.ELOOP:
                        continue  # a dangling link that no reader would open
                    raise UserError(f"data.root: symlink {entry.path} cannot be followed: {describe(error)}") from None
                if stat.S_ISDIR(mode):
                    self.folder(entry.path, entry.path)
                elif entry.name.lower().endswith(_IMAGE_EXTENSIONS):
                    if not stat.S_ISREG(mode):
                        raise UserError(f"data.root: {entry.path} leads to {target}, {_kind(mode)}, not an image "
                                        "file; only regular files are read")
                    self.linked_files.append((entry.path, target))
                    names.append(entry.name)
            elif entry.is_dir(follow_symlinks=False):
                self.folder(entry.path, link)
            elif entry.name.lower().endswith(_IMAGE_EXTENSIONS):
                if not entry.is_file(follow_symlinks=False):  # a named pipe called x.JPEG would block a reader
                    raise UserError(f"data.root: {entry.path} is {_kind(entry.stat(follow_symlinks=False).st_mode)}, "
                                    "not an image file; only regular files are read")
                names.append(entry.name)
        self.listing.append((path, names))

    def check_linked_files(self) -> None:
        """A link to an image that the walk also reads as itself, or that another link reaches, is refused."""
        reached: dict[str, str] = {}
        for link, target in self.linked_files:
            folder, name = os.path.split(target)
            if folder in self.folders and name.lower().endswith(_IMAGE_EXTENSIONS):
                raise self._twice(link, target, os.path.join(self.folders[folder][0], name))
            if target in reached:
                raise self._twice(link, target, reached[target])
            reached[target] = link


def _scan(folder: Path, classes: dict[str, int], image_size: int) -> FolderSet:
    """Every image under ``folder/<class>/``, in torchvision's ImageFolder order (sorted by folder, then name)."""
    present = _class_folders(folder)
    unknown = [name for name in present if name not in classes]
    if unknown:
        raise UserError(f"data.root: {folder} has class folders the training split lacks: {', '.join(unknown[:3])}")
    walk = _Walk(folder)
    paths, targets = [], []
    for name in present:
        class_dir = os.path.join(folder, name)
        images = walk.images(class_dir)
        if not images:
            raise UserError(f"data.root: class folder {class_dir} holds no image (files ending in "
                            f"{', '.join(_IMAGE_EXTENSIONS)}); remove the folder or add its images")
        paths.extend(images)
        targets.extend([classes[name]] * len(images))
    walk.check_linked_files()
    return FolderSet(paths, targets, image_size)


def _test_entry(list_path: Path, number: int, entry: str, val_dir: Path, classes: dict[str, int]) -> str:
    """A test-list line, normalised (``./``, ``//``), as a path that must stay inside ``val/<class>/``."""
    where = f"data.test_list: {list_path} line {number}: {entry!r}"
    if "\0" in entry:
        raise UserError(f"{where} holds a NUL byte; expected <class>/<file>")
    parts = entry.split("/")
    if entry.startswith("/") or ".." in parts:
        raise UserError(f"{where} leads outside {val_dir}; entries are <class>/<file> inside it, without '..'")
    normal = posixpath.normpath(entry)
    name = normal.split("/")[0]
    if "/" not in normal or name not in classes:
        raise UserError(f"{where} is not <class>/<file> of a known class")
    return normal


def _read_list(path: Path, val_dir: Path, classes: dict[str, int], image_size: int) -> FolderSet:
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):  # a named pipe would block the read forever
            raise UserError(f"data.test_list: {path} is {_kind(mode)}, not a file of <class>/<file> lines")
        raw = path.read_bytes()
    except OSError as error:
        raise UserError(f"data.test_list: cannot read {path}: {describe(error)}") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark from an editor is not part of the first entry
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise UserError(f"data.test_list: {path} is not UTF-8 text (line {line}, byte {error.start}); expected one "
                        "<class>/<file> per line") from None
    class_dirs: dict[str, str] = {}
    seen: dict[str, int] = {}
    paths, targets, missing = [], [], []
    for number, line in enumerate(text.split("\n"), start=1):  # the line numbers an editor shows
        entry = line.strip()
        if not entry:
            continue
        normal = _test_entry(path, number, entry, val_dir, classes)
        name = normal.split("/")[0]
        file = str(val_dir / normal)
        if name not in class_dirs:
            class_dirs[name] = os.path.realpath(val_dir / name)
        real = os.path.realpath(file)
        if not _inside(real, class_dirs[name]) or real == class_dirs[name]:  # through a link to elsewhere
            raise UserError(f"data.test_list: {path} line {number}: {entry!r} leads to {real}, outside "
                            f"{val_dir / name}; a test image must be in its class's folder under {val_dir}")
        if real in seen:
            raise UserError(f"data.test_list: {path} line {number}: {entry!r} is the image of line {seen[real]} "
                            "again; each test image is listed once")
        seen[real] = number
        try:
            mode = os.stat(file).st_mode
        except FileNotFoundError:
            missing.append(file)
            mode = stat.S_IFREG
        except OSError as error:  # a cycle of links (ELOOP), a permission
            raise UserError(f"data.test_list: {path} line {number}: {file}: {describe(error)}") from None
        if not stat.S_ISREG(mode):
            raise UserError(f"data.test_list: {path} line {number}: {file} is {_kind(mode)}, not an image file; "
                            "only regular files are read")
        paths.append(file)
        targets.append(classes[name])
    if missing:
        raise UserError(f"data.root: {len(missing)} of the {len(paths)} test images listed in {path} are missing "
                        f"under {val_dir}, e.g. {missing[0]}")
    if not paths:
        raise UserError(f"data.test_list: {path} lists no image; expected one <class>/<file> per line")
    return FolderSet(paths, targets, image_size)


def check_headers(*sets: FolderSet) -> None:
    """Every image's header (:func:`check_header`), before any training: a bad file is one line naming it."""
    paths = [path for data in sets for path in data.paths]
    if len(paths) > 10_000:
        log.info("reading the headers of %d images", len(paths))
    for path in paths:
        check_header(path)


def read_tree(settings: "DataSettings", need_train: bool = True, *, classes: dict[str, int] | None = None,
              test_list: Path | None = None) -> tuple[FolderSet | None, FolderSet]:
    """The training split (file names; None without ``need_train``) and the test split, in order; every image in
    them is a regular file inside its split whose header Pillow reads (:func:`check_headers`). ``classes``: a
    fixed class map (imagenet's wnids) instead of the sorted folders; ``test_list``: the test split's list when
    ``data.test_list`` names none (imagenet: RobustBench's), else every image of val/ in a fixed shuffled order."""
    root = Path(settings.root)
    train_dir, val_dir = root / "train", root / "val"
    for folder in (train_dir, val_dir) if need_train or classes is None else (val_dir,):
        if not folder.is_dir():
            raise UserError(f"data.root: {folder} does not exist (expected {root}/train/<class>/<image> and "
                            f"{root}/val/<class>/<image>, the layout torchvision's ImageFolder reads)")
    if classes is not None:
        if need_train:
            _classes(settings, train_dir, classes)  # checks that the folders are the map's
    else:
        classes = _classes(settings, train_dir, None)
    train = _scan(train_dir, classes, settings.image_size) if need_train else None
    if settings.test_list is not None:
        test = _read_list(Path(settings.test_list), val_dir, classes, settings.image_size)
    elif test_list is not None:
        test = _read_list(test_list, val_dir, classes, settings.image_size)
    else:  # all of val/, shuffled once so that "the first n" holds every class
        test = _scan(val_dir, classes, settings.image_size)
        test = test.take(torch.randperm(len(test), generator=torch.Generator().manual_seed(_TEST_ORDER_SEED)))
    if not len(test):
        raise UserError(f"data.root: {val_dir} holds no test image")
    check_headers(*([train] if train is not None else []), test)
    return train, test


def check_tree_root(settings: "DataSettings") -> None:
    """A streamed dataset's data.root, before any work: it cannot be downloaded, and must exist."""
    if settings.download:
        raise ConfigError(f"data.download: {settings.dataset} cannot be downloaded; put the train/<class>/ and "
                          "val/<class>/ folders under data.root")
    if not Path(settings.root).is_dir():
        raise ConfigError(f"data.root: directory {settings.root!r} does not exist; put {settings.dataset}'s "
                          "train/<class>/ and val/<class>/ folders there")
