"""Loader factory: train and val loaders from a converted dataset directory (``nps convert``).

:func:`make_loaders` returns two loaders and a :class:`LoaderInfo`. Both loaders have ``len()`` and yield
``(images, labels)``: images float32 ``N x C x H x W`` in channels_last memory on ``device``, normalized with the
train split's per-channel mean/std from ``meta.json``; labels int64 on ``device``. ``C`` is 3 (grayscale stored as
three equal channels) or 1 when ``in_channels=1`` (luma, exact for grayscale).

Two implementations sit behind that interface:

* **ffcv** -- FFCV ``Loader`` pipelines, decoding and augmenting on CPU threads, then ``ToDevice(non_blocking)``;
  uint8 goes to the device and becomes float there.
    - train, small images (both sides <= 64 px, all one size): pad-and-crop (``RandomTranslate``, zero fill, pad
      = side / 8) + ``RandomHorizontalFlip``; resized on the device when ``resolution`` differs (the paper's CIFAR
      at 224 x 224 by upsampling);
    - train, larger or variable-size images: ``RandomResizedCropRGBImageDecoder`` to ``resolution`` + flip;
    - val: the image as stored (small) or ``CenterCropRGBImageDecoder`` (ratio 224/256) to ``resolution``.
* **on-device** -- :class:`~nps.datasets.device_loader.DeviceLoader`: the whole split as one uint8 tensor on the
  device, the same pad-and-crop + flip done there in one gather per batch.

:func:`make_holdout_loaders` does the same with a **holdout** carved from the train split (what base training's
plateau rule scores, never the test split): the last ``holdout_images`` of a permutation of the split drawn from
``holdout_seed`` (:func:`holdout_split`), evaluated like val (no augmentation) and never trained on. With the
on-device loader a pass's order, crops and flips are a function of ``(seed, epoch)`` alone (``set_epoch``); with
FFCV the order is, its augmentation is not (numba's per-thread generators, unseeded).

``on_device="auto"`` picks the on-device loader when all images have one size, both sides <= 64 px, and the
tensors it keeps (train: padded, 4 bytes a pixel; val: 3 bytes a pixel) take at most ``min(4 GiB, 25% of the
device's free memory)`` (CUDA: ``mem_get_info``; CPU: ``MemAvailable``). CIFAR-10 needs about 350 MiB,
Fashion-MNIST about 335 MiB. ``LoaderInfo.implementation`` and ``LoaderInfo.reason`` say which was used and why.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from nps.datasets.batch_ops import BatchFinisher
from nps.datasets.errors import DatasetError
from nps.datasets.ffcv_epoch import end_epoch_later
from nps.datasets.meta import load_meta

log = logging.getLogger(__name__)

SMALL_IMAGE_MAX_SIDE = 64
ON_DEVICE_MAX_BYTES = 4 << 30
ON_DEVICE_MEMORY_FRACTION = 0.25
VAL_CENTER_CROP_RATIO = 224 / 256
DEFAULT_LARGE_RESOLUTION = 224
ORDERS = ("random", "quasi_random", "sequential")
HOLDOUT_AUTO_MAX = 5000  # holdout_images = "auto": this many, or a tenth of the train split when that is fewer
HOLDOUT_STREAM = 0x401D  # mixed into the holdout's seed: the permutation is its own, not the train order's


@dataclass
class LoaderInfo:
    """Which loader implementation :func:`make_loaders` picked, why, and what it yields."""

    implementation: str
    reason: str
    device: str
    image_shape: Optional[List[int]]
    resolution: List[int]
    in_channels: int
    mean: List[float]
    std: List[float]
    train_batches: int
    val_batches: int
    train_augmentation: str
    fingerprint: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.implementation} loader ({self.reason}); {self.train_augmentation}; "
                f"{self.in_channels}x{self.resolution[0]}x{self.resolution[1]} on {self.device}")


class FFCVImageLoader:
    """An FFCV ``Loader`` whose uint8 image batches are finished on the device (float, normalize, resize).

    Labels are cloned: FFCV reuses its output buffers a few batches later.
    """

    implementation = "ffcv"

    def __init__(self, loader, finisher: BatchFinisher):
        self.loader = loader
        self.finisher = finisher
        self.batch_size = loader.batch_size

    @property
    def num_samples(self) -> int:
        return len(self.loader.first_traversal_order)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch``: FFCV draws its order from the seed and the epoch. (Its augmentations
        draw from numba's per-thread generators, which FFCV does not seed: only the on-device loader makes a
        pass's crops and flips a function of seed and epoch too.)"""
        self.loader.next_epoch = int(epoch)

    def __iter__(self):
        threads = torch.get_num_threads()
        batches = iter(self.loader)
        # FFCV sets torch's thread count to its own num_workers; the caller's setting wins (on CPU the finishing
        # ops would otherwise compete with FFCV's decoding threads).
        torch.set_num_threads(threads)
        try:
            for images, labels in batches:
                yield self.finisher(images), labels.reshape(-1).clone()
        finally:  # a consumer that stops early would leave FFCV's thread and its buffers alive (ffcv_epoch)
            end_epoch_later(batches)


def free_device_memory(device: torch.device) -> int:
    """Bytes free on ``device``: ``cuda.mem_get_info`` on CUDA, ``MemAvailable`` of /proc/meminfo on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def choose_on_device(meta: dict, device: torch.device) -> Tuple[bool, str]:
    """Apply the auto rule (module docstring): ``(use_on_device, reason)``."""
    shape = meta.get("image_shape")
    if not shape:
        return False, "images differ in size"
    if max(shape) > SMALL_IMAGE_MAX_SIDE:
        return False, f"images of {shape[0]}x{shape[1]} px are larger than {SMALL_IMAGE_MAX_SIDE} px"
    from nps.datasets.device_loader import device_bytes

    padding = max(1, round(max(shape) / 8))
    need = (device_bytes(meta["counts"]["train"], shape[0], shape[1], padding, augment=True)
            + device_bytes(meta["counts"]["val"], shape[0], shape[1], padding, augment=False))
    budget = min(ON_DEVICE_MAX_BYTES, int(ON_DEVICE_MEMORY_FRACTION * free_device_memory(device)))
    if need > budget:
        return False, f"dataset needs {need / 2**20:.0f} MiB, over the {budget / 2**20:.0f} MiB on-device budget"
    return True, f"dataset fits on {device.type} ({need / 2**20:.0f} MiB of a {budget / 2**20:.0f} MiB budget)"


def _order_option(order: str):
    from ffcv.loader import OrderOption

    return {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM,
            "sequential": OrderOption.SEQUENTIAL}[order]


def _image_pipeline(train: bool, small: bool, augment: bool, padding: int, out_size: Optional[int],
                    device: torch.device) -> list:
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip, RandomTranslate, ToDevice, ToTensor, ToTorchImage

    if small:
        ops = [SimpleRGBImageDecoder()]
        if train and augment:
            ops += [RandomTranslate(padding=padding), RandomHorizontalFlip()]
    elif train and augment:
        ops = [RandomResizedCropRGBImageDecoder((out_size, out_size)), RandomHorizontalFlip()]
    else:
        ops = [CenterCropRGBImageDecoder((out_size, out_size), ratio=VAL_CENTER_CROP_RATIO)]
    ops += [ToTensor()]
    if device.type != "cpu":
        ops += [ToDevice(device, non_blocking=True)]
    return ops + [ToTorchImage(channels_last=True)]


def _label_pipeline(device: torch.device) -> list:
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor

    ops = [IntDecoder(), ToTensor(), Squeeze(1)]
    return ops + ([ToDevice(device, non_blocking=True)] if device.type != "cpu" else [])


def default_num_workers() -> int:
    """Loader threads by default: the CPUs this process may use."""
    return max(1, len(os.sched_getaffinity(0)))


def resolve_holdout(images: Union[int, str], train_count: int) -> int:
    """How many training images a holdout of ``images`` takes from a train split of ``train_count``: ``"auto"`` is
    ``min(HOLDOUT_AUTO_MAX, train_count // 10)``; a number is itself, and must leave at least half the split to
    train on (DatasetError otherwise)."""
    if images == "auto":
        return min(HOLDOUT_AUTO_MAX, int(train_count) // 10)
    if isinstance(images, bool) or not isinstance(images, int) or images < 0:
        raise DatasetError(f"holdout of {images!r} images: use 'auto' or a number >= 0")
    if images > int(train_count) // 2:
        raise DatasetError(f"a holdout of {images} images leaves too few of the {train_count} training images to "
                           f"train on: use at most {int(train_count) // 2}")
    return int(images)


def holdout_split(train_count: int, holdout_images: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train indices, holdout indices) of a train split of ``train_count`` images, each sorted: the holdout is the
    last ``holdout_images`` of a permutation drawn from ``seed`` alone, so the same experiment always holds out the
    same images, whatever the loader, device or batch size."""
    order = np.random.default_rng([HOLDOUT_STREAM, int(seed)]).permutation(int(train_count))
    cut = int(train_count) - int(holdout_images)
    return np.sort(order[:cut]), np.sort(order[cut:])


def make_loaders(data_dir: Union[str, os.PathLike], *, batch_size: int, resolution: Optional[int] = None,
                 device: Union[str, torch.device] = "cpu", in_channels: int = 3, num_workers: Optional[int] = None,
                 order: str = "random", drop_last: bool = True, os_cache: bool = True, seed: int = 0,
                 distributed: bool = False, on_device: Union[str, bool] = "auto", augment: bool = True,
                 val_batch_size: Optional[int] = None, batches_ahead: int = 3, dtype: torch.dtype = torch.float32):
    """Build the train and val loaders of a converted dataset.

    Parameters
    ----------
    data_dir : path
        Directory written by ``nps convert`` (``train.beton``, ``val.beton``, ``meta.json``).
    batch_size : int
        Train batch size (also val, unless ``val_batch_size``).
    resolution : int, optional
        Output side length. Small images: resized on the device when it differs from the stored size (``None``:
        stored size). Large images: the crop size (``None``: 224).
    device : str or torch.device
        Where batches end up (``cpu`` or ``cuda[:i]``); uint8 is moved there and becomes float there.
    in_channels : int
        3, or 1 for a model that takes one channel.
    num_workers : int, optional
        FFCV decoding threads (default: available CPUs).
    order : str
        ``random``, ``quasi_random`` or ``sequential`` (train; val is always sequential).
    drop_last : bool
        Drop the incomplete last train batch (val keeps it).
    os_cache : bool
        FFCV: rely on the OS page cache (True) or FFCV's process cache (False).
    seed : int
        Seed of the train order (and of the on-device augmentation).
    distributed : bool
        Shard each epoch across ``torch.distributed`` ranks.
    on_device : "auto", True or False
        Use the on-device loader: automatically when the dataset fits (module docstring), always, or never.
    augment : bool
        Train-time augmentation; False gives the val pipeline on the train split.
    val_batch_size : int, optional
        Val batch size (default ``batch_size``).
    batches_ahead : int
        FFCV: batches prepared in advance.
    dtype : torch.dtype
        Output image dtype.

    Returns
    -------
    (train_loader, val_loader, LoaderInfo)
    """
    train, _, val, info = _build_loaders(
        data_dir, batch_size=batch_size, resolution=resolution, device=device, in_channels=in_channels,
        num_workers=num_workers, order=order, drop_last=drop_last, os_cache=os_cache, seed=seed,
        distributed=distributed, on_device=on_device, augment=augment, val_batch_size=val_batch_size,
        batches_ahead=batches_ahead, dtype=dtype)
    return train, val, info


def make_holdout_loaders(data_dir: Union[str, os.PathLike], *, holdout_images: Union[int, str], holdout_seed: int,
                         **options):
    """:func:`make_loaders` with a holdout carved from the train split: ``(train, holdout, val, LoaderInfo)``.

    ``train`` yields the train split without the holdout (augmented, in the order of ``seed`` and the epoch),
    ``holdout`` the held-out training images as ``val`` yields its own (sequential, no augmentation, at the val
    batch size); the holdout's images are chosen by :func:`holdout_split` from ``holdout_seed``. ``holdout_images``
    is resolved by :func:`resolve_holdout` (``"auto"``, or a number up to half the split); 0 gives ``holdout``
    None and the whole train split. ``LoaderInfo.extra["holdout_images"]`` says how many were held out.
    ``options`` are :func:`make_loaders`' keywords.
    """
    meta = load_meta(Path(data_dir))
    count = int(meta["counts"]["train"])
    held = resolve_holdout(holdout_images, count)
    carve = holdout_split(count, held, holdout_seed) if held else None
    return _build_loaders(data_dir, carve=carve, **options)


def _build_loaders(data_dir: Union[str, os.PathLike], *, batch_size: int, resolution: Optional[int] = None,
                   device: Union[str, torch.device] = "cpu", in_channels: int = 3, num_workers: Optional[int] = None,
                   order: str = "random", drop_last: bool = True, os_cache: bool = True, seed: int = 0,
                   distributed: bool = False, on_device: Union[str, bool] = "auto", augment: bool = True,
                   val_batch_size: Optional[int] = None, batches_ahead: int = 3, dtype: torch.dtype = torch.float32,
                   carve=None):
    """(train, holdout or None, val, info); ``carve`` is (train indices, holdout indices) of the train split."""
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    device = torch.device(device)
    if order not in ORDERS:
        raise DatasetError(f"order {order!r}: choose from {', '.join(ORDERS)}")
    if in_channels not in (1, 3):
        raise DatasetError(f"in_channels {in_channels}: the loaders emit 1 or 3 channels")
    if batch_size < 1:
        raise DatasetError(f"batch_size {batch_size}: must be at least 1")
    paths = {split: data_dir / meta["files"][split] for split in ("train", "val")}
    for path in paths.values():
        if not path.is_file():
            raise DatasetError(f"{path}: missing (re-run nps convert)")
    num_workers = default_num_workers() if num_workers is None else int(num_workers)
    val_batch_size = val_batch_size or batch_size
    shape = meta["image_shape"]
    small = bool(shape) and max(shape) <= SMALL_IMAGE_MAX_SIDE
    padding = max(1, round(max(shape) / 8)) if shape else 0
    out_size = resolution or (max(shape) if small else DEFAULT_LARGE_RESOLUTION)

    if on_device == "auto":
        use_device, reason = choose_on_device(meta, device)
    elif on_device is True:
        if not shape:
            raise DatasetError(f"{data_dir}: on_device=True needs images of one size (meta.json image_shape)")
        use_device, reason = True, "requested (on_device=True)"
    elif on_device is False:
        use_device, reason = False, "requested (on_device=False)"
    else:
        raise DatasetError(f"on_device {on_device!r}: use 'auto', True or False")

    finisher = BatchFinisher(meta["mean"], meta["std"], device=device, in_channels=in_channels, dtype=dtype,
                             resolution=out_size if (small or use_device) else None)
    if use_device or small:
        augmentation = f"pad-and-crop (pad {padding}) + horizontal flip"
        if out_size != max(shape):
            augmentation += f", resized {shape[0]}x{shape[1]} -> {out_size}x{out_size} on {device.type}"
    else:
        augmentation = f"RandomResizedCrop to {out_size}x{out_size} + horizontal flip"
    if not augment:
        augmentation = "none"

    if use_device:
        from nps.datasets.device_loader import DeviceLoader, load_split

        splits = {name: load_split(str(path), device=device, num_workers=num_workers) for name, path in paths.items()}
        if carve is not None:  # the holdout's images leave the train split before the loader packs it
            images, labels = splits.pop("train")
            train_idx, holdout_idx = (torch.as_tensor(i, device=images.device) for i in carve)
            splits["train"] = images[train_idx], labels[train_idx]
            splits["holdout"] = images[holdout_idx], labels[holdout_idx]
            del images, labels
        train = DeviceLoader(*splits["train"], batch_size=batch_size, finisher=finisher, augment=augment,
                             padding=padding, order=order, drop_last=drop_last, seed=seed, distributed=distributed)
        val = DeviceLoader(*splits["val"], batch_size=val_batch_size, finisher=finisher, augment=False,
                           order="sequential", drop_last=False, seed=seed, distributed=distributed)
        holdout = None if carve is None else DeviceLoader(
            *splits["holdout"], batch_size=val_batch_size, finisher=finisher, augment=False, order="sequential",
            drop_last=False, seed=seed, distributed=distributed)
        implementation = "on-device"
    else:
        from ffcv.loader import Loader

        def build(split: str, is_train: bool, indices=None):
            pipelines = {"image": _image_pipeline(is_train, small, augment, padding, out_size, device),
                         "label": _label_pipeline(device)}
            loader = Loader(str(paths[split]), batch_size=batch_size if is_train else val_batch_size,
                            num_workers=num_workers, os_cache=os_cache,
                            order=_order_option(order if is_train else "sequential"),
                            drop_last=drop_last if is_train else False, seed=seed, indices=indices,
                            distributed=distributed, pipelines=pipelines, batches_ahead=batches_ahead)
            return FFCVImageLoader(loader, finisher)

        threads = torch.get_num_threads()
        train = build("train", True, None if carve is None else carve[0])
        val = build("val", False)
        holdout = None if carve is None else build("train", False, carve[1])  # evaluated as val is
        torch.set_num_threads(threads)  # see FFCVImageLoader.__iter__
        implementation = "ffcv"

    info = LoaderInfo(implementation=implementation, reason=reason, device=str(device), image_shape=shape,
                      resolution=[out_size, out_size], in_channels=in_channels, mean=list(meta["mean"]),
                      std=list(meta["std"]), train_batches=len(train), val_batches=len(val),
                      train_augmentation=augmentation, fingerprint=meta["fingerprint"],
                      extra={"batch_size": batch_size, "num_workers": num_workers, "order": order,
                             "holdout_images": 0 if carve is None else int(len(carve[1]))})
    log.info("%s", info)
    return train, holdout, val, info
