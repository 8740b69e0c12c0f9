"""The on-device loader (the airbench approach): the whole uint8 dataset lives on the device, augmented there.

For CIFAR-sized data the CPU work of a loader (decode, crop, flip, copy) costs more than the few hundred MB the
whole split takes on the device. :func:`load_split` decodes a .beton once (FFCV, sequential order) into one
``N x H x W x 3`` uint8 tensor on the device; :class:`DeviceLoader` then draws each batch with one gather that does
the pad-and-crop and the horizontal flip together, and hands it to the same
:class:`~nps.datasets.batch_ops.BatchFinisher` as the FFCV loader, so both yield the same kind of batch.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator, Tuple

import torch

log = logging.getLogger(__name__)


def load_split(path: str, *, device: torch.device, num_workers: int, batch_size: int = 1024):
    """Decode every image and label of one .beton into device tensors (``N x H x W x 3`` uint8, ``N`` int64).

    The images must all have the same size (``meta.json`` ``image_shape`` not null). Raw-mode files are copied
    straight from the stored bytes; JPEG ones are decoded by an FFCV loader in sequential order.
    """
    from nps.datasets.betonfile import read_raw_array, read_summary

    summary = read_summary(path)
    if (summary.modes == 1).all():
        images, labels = read_raw_array(path)
        log.info("loaded %s onto %s: %s", path, device, images.shape)
        return torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)

    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToTensor

    threads = torch.get_num_threads()  # FFCV sets torch's thread count to its worker count; give it back after
    loader = Loader(path, batch_size=batch_size, num_workers=num_workers, order=OrderOption.SEQUENTIAL,
                    drop_last=False, os_cache=True,
                    pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()],
                               "label": [IntDecoder(), ToTensor(), Squeeze(1)]})
    count = int(loader.reader.num_samples)
    images = labels = None
    start = 0
    for batch_images, batch_labels in loader:
        if images is None:
            images = torch.empty((count, *batch_images.shape[1:]), dtype=torch.uint8, device=device)
            labels = torch.empty(count, dtype=torch.int64, device=device)
        stop = start + len(batch_images)
        images[start:stop].copy_(batch_images)
        labels[start:stop].copy_(batch_labels.reshape(-1))
        start = stop
    torch.set_num_threads(threads)
    if start != count:  # pragma: no cover - FFCV returns every sample with drop_last=False
        raise RuntimeError(f"{path}: read {start} of {count} samples")
    log.info("loaded %s onto %s: %s", path, device, tuple(images.shape))
    return images, labels


def _rank_and_world(distributed: bool) -> Tuple[int, int]:
    if not distributed:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True needs torch.distributed to be initialized")
    return dist.get_rank(), dist.get_world_size()


def pack_padded(images: torch.Tensor, padding: int) -> torch.Tensor:
    """``N x H x W x 3`` uint8 -> ``N x (H+2p) x (W+2p)`` int32, one pixel per int32 (RGB + a zero byte), zero border.

    A pixel as one 4-byte element turns crop + flip into a single ``index_select`` of int32 (about 10x faster on
    CPU than indexing 3-byte rows), and the zero border makes every crop index valid, so no masking pass is needed.
    """
    count, height, width, _ = images.shape
    packed = torch.zeros((count, height + 2 * padding, width + 2 * padding, 4), dtype=torch.uint8,
                         device=images.device)
    packed[:, padding:padding + height, padding:padding + width, :3] = images
    return packed.view(torch.int32).reshape(count, height + 2 * padding, width + 2 * padding)


def device_bytes(count: int, height: int, width: int, padding: int, augment: bool) -> int:
    """Device memory one split takes in a :class:`DeviceLoader` (packed and padded when augmented)."""
    if augment:
        return count * (height + 2 * padding) * (width + 2 * padding) * 4
    return count * height * width * 3


class DeviceLoader:
    """Batches drawn from a dataset held on the device, with pad-and-crop and flip done there.

    Parameters
    ----------
    images : torch.Tensor
        ``N x H x W x 3`` uint8 on the device. With ``augment`` it is repacked (see :func:`pack_padded`) and the
        caller's tensor is not kept.
    labels : torch.Tensor
        ``N`` int64 on the device.
    batch_size : int
        Images per batch.
    finisher : callable
        uint8 NCHW batch -> model input (see :class:`~nps.datasets.batch_ops.BatchFinisher`).
    augment : bool
        Random translate by up to ``padding`` pixels (zero fill, i.e. pad-and-crop) and horizontal flip.
    padding : int
        Pixels of pad-and-crop.
    order : str
        ``random`` (a new permutation each epoch, from ``seed`` and the epoch number, see :meth:`set_epoch`),
        ``quasi_random`` (same as random here: the data is already in memory), or ``sequential``.
    drop_last : bool
        Drop the last incomplete batch.
    seed : int
        Seed for the order and the augmentation.
    distributed : bool
        Each rank takes its share of every permutation (as ``DistributedSampler``: padded to a multiple of the
        world size).
    """

    implementation = "on-device"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
                 finisher: Callable[[torch.Tensor], torch.Tensor], augment: bool = True, padding: int = 4,
                 order: str = "random", drop_last: bool = True, seed: int = 0, distributed: bool = False):
        self.labels = labels
        self.count, self.height, self.width = int(images.shape[0]), int(images.shape[1]), int(images.shape[2])
        self.batch_size = int(batch_size)
        self.finisher = finisher
        self.augment, self.padding = augment, int(padding)
        self.order, self.drop_last, self.seed = order, drop_last, int(seed)
        self.rank, self.world = _rank_and_world(distributed)
        self.device = images.device
        self.epoch = 0
        if augment:
            self.packed = pack_padded(images, self.padding).reshape(-1)
            self.images = None
            self._rows = torch.arange(self.height, device=self.device)
            self._cols = torch.arange(self.width, device=self.device)
            self._cols_flipped = self._cols.flip(0)
        else:
            self.images = images

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        return -(-self.count // self.world) if self.world > 1 else self.count

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def _epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        if self.order == "sequential":
            order = torch.arange(self.count, device=self.device)
        else:
            order = torch.randperm(self.count, generator=generator, device=self.device)
        if self.world > 1:
            padded = self.num_samples * self.world
            order = torch.cat([order, order[: padded - self.count]])[self.rank::self.world]
        return order

    def _crop_flip(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One gather: ``out[b, y, x] = padded[b, y + dy, (flip ? W-1-x : x) + dx]`` with ``dy, dx`` in ``0..2p``."""
        count, pad = len(index), self.padding
        padded_h, padded_w = self.height + 2 * pad, self.width + 2 * pad
        shift = torch.randint(0, 2 * pad + 1, (2, count), generator=generator, device=self.device)
        flip = torch.rand(count, generator=generator, device=self.device) < 0.5
        row_start = index[:, None] * (padded_h * padded_w) + (self._rows[None, :] + shift[0][:, None]) * padded_w
        cols = torch.where(flip[:, None], self._cols_flipped[None, :], self._cols[None, :]) + shift[1][:, None]
        where = (row_start[:, :, None] + cols[:, None, :]).reshape(-1)
        pixels = self.packed.index_select(0, where)  # int32 RGB0 pixels
        return pixels.view(torch.uint8).view(count, self.height, self.width, 4)[..., :3]

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch``: its order and augmentation depend on ``seed`` and ``epoch`` only, not
        on how often the loader was iterated before (each pass otherwise advances the epoch by one)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        order = self._epoch_order(generator)
        for b in range(len(self)):
            index = order[b * self.batch_size:(b + 1) * self.batch_size]
            if self.augment:
                batch = self._crop_flip(index, generator)
            else:
                batch = self.images[index]
            # N x H x W x 3 -> N x 3 x H x W view (channels_last memory when contiguous)
            yield self.finisher(batch.permute(0, 3, 1, 2)), self.labels[index]
