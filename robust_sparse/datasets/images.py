"""Images in memory as uint8 tensors, batched and augmented on the device.

Every in-memory training set fits as uint8 (CIFAR-10: 150 MB), so the loader keeps the images as one tensor and
does the usual augmentation (random crop with zero padding, horizontal flip) on whole batches. That is faster
than per-image PIL transforms on 2 CPU cores and, because each epoch's order and crops come from a generator
seeded by ``(seed, epoch)``, a resumed run sees exactly the batches an uninterrupted run would have seen.

Inputs handed to models are float in [0, 1]; models own their normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from robust_sparse.datasets.registry import Dataset


@dataclass
class ImageSet:
    """Images as uint8 [N, C, H, W] and int64 labels, on the CPU."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor | slice) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index])

    @property
    def example_shape(self) -> tuple[int, ...]:
        """One example's (C, H, W), as the model sees it."""
        return tuple(self.images.shape[1:])


# ----------------------------------------------------------------------------------------------------------
# batching and augmentation


def augment(images: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and optional horizontal flip, for a whole uint8 batch at once."""
    n, _, height, width = images.shape
    if padding:
        padded = torch.nn.functional.pad(images, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        # drawn on the CPU (the loader's generator); non_blocking: a blocking copy to the GPU is a host sync
        rows = (dy[:, None] + torch.arange(height)[None, :]).to(images.device, non_blocking=True)  # [n, H]
        cols = (dx[:, None] + torch.arange(width)[None, :]).to(images.device, non_blocking=True)  # [n, W]
        batch_index = torch.arange(n, device=images.device)[:, None, None, None]
        channel_index = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        images = padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        images = torch.where(flip.to(images.device, non_blocking=True)[:, None, None, None], images.flip(-1), images)
    return images


class BatchLoader:
    """Iterates over an :class:`ImageSet` in batches of float [0,1] images on ``device``.

    With ``shuffle`` the order (and the augmentation) of epoch ``e`` is a function of ``(seed, e)`` only.
    """

    def __init__(
        self,
        data: ImageSet,
        batch_size: int,
        device: torch.device,
        *,
        shuffle: bool = False,
        seed: int = 0,
        info: "Dataset | None" = None,
        augment_batches: bool = False,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.data = data
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.seed = seed
        self.info = info
        self.augment_batches = augment_batches and info is not None
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size  # data parallel: this rank takes every world_size-th image
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard_size(self) -> int:
        return len(range(self.rank, len(self.data) - len(self.data) % self.world_size, self.world_size))

    def __len__(self) -> int:
        full, rest = divmod(self._shard_size(), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.data)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        # Every rank draws the same permutation and keeps its own slice of equal length.
        order = order[: n - n % self.world_size][self.rank :: self.world_size]
        for batch_number in range(len(self)):
            index = order[batch_number * self.batch_size : (batch_number + 1) * self.batch_size]
            images = self.data.images[index].to(self.device, non_blocking=True)
            if self.augment_batches:
                assert self.info is not None
                images = augment(images, self.info.crop_padding, self.info.hflip, generator)
            labels = self.data.labels[index].to(self.device, non_blocking=True)
            yield images.float().div_(255), labels
