"""Loader factory: both implementations (FFCV, on-device) yield the same normalized channels_last batches."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import nps.datasets.loaders as loaders_module
from nps.datasets.betonfile import read_raw_images
from nps.datasets.convert import convert_dataset
from nps.datasets.device_loader import DeviceLoader
from nps.datasets.errors import DatasetError
from nps.datasets.loaders import make_loaders


@pytest.fixture(scope="module")
def rgb_dir(tmp_path_factory):
    """A small 32 x 32 RGB dataset (npz) whose channels have different statistics."""
    root = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    x[..., 0] //= 2  # channel 0 darker: per-channel normalization matters
    np.savez(root / "d.npz", x_train=x[:200], y_train=np.arange(200) % 10, x_test=x[200:],
             y_test=np.arange(100) % 10)
    convert_dataset("npz", root / "out", src=root / "d.npz", workers=1)
    return root / "out"


@pytest.fixture(scope="module")
def fm600(fmnist_dir):
    return fmnist_dir(600)


def collect(loader):
    images, labels = zip(*[(x.clone(), y.clone()) for x, y in loader])
    return torch.cat(images), torch.cat(labels)


def reference(data_dir: Path, split: str):
    """Stored uint8 pixels (N x H x W x 3), normalized the documented way, and labels."""
    import json

    meta = json.loads((data_dir / "meta.json").read_text())
    images, labels = read_raw_images(data_dir / f"{split}.beton")
    pixels = np.stack(images)
    mean, std = np.array(meta["mean"]), np.array(meta["std"])
    return pixels, (pixels - mean) / std, labels, mean, std


def check_batch_format(images, labels, channels, size):
    assert images.dtype == torch.float32 and images.device.type == "cpu"
    assert images.shape[1:] == (channels, size, size)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and labels.shape == images.shape[:1]


@pytest.mark.parametrize("on_device", [False, True])
def test_unaugmented_batches_are_the_normalized_stored_pixels(rgb_dir, on_device):
    train, val, info = make_loaders(rgb_dir, batch_size=64, on_device=on_device, order="sequential", augment=False,
                                    drop_last=False, num_workers=2)
    assert info.implementation == ("on-device" if on_device else "ffcv")
    for loader, split, count in ((train, "train", 200), (val, "val", 100)):
        assert len(loader) == -(-count // 64)
        images, labels = collect(loader)
        check_batch_format(images, labels, 3, 32)
        _, expected, expected_labels, _, _ = reference(rgb_dir, split)
        assert np.allclose(images.permute(0, 2, 3, 1).numpy(), expected, atol=1e-5)
        assert np.array_equal(labels.numpy(), expected_labels)


def _matches_shift_flip(out: np.ndarray, src: np.ndarray, pad: int) -> bool:
    """Whether ``out`` is ``src`` translated by up to ``pad`` pixels (zero fill), maybe mirrored."""
    height, width = src.shape[:2]
    padded = np.zeros((height + 2 * pad, width + 2 * pad, src.shape[2]), src.dtype)
    padded[pad:pad + height, pad:pad + width] = src
    for image in (padded, padded[:, ::-1]):
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                if np.array_equal(image[dy:dy + height, dx:dx + width], out):
                    return True
    return False


@pytest.mark.parametrize("on_device", [False, True])
def test_augmented_batches_are_shifted_and_flipped_copies(fm600, on_device):
    # one FFCV thread: numba compiles the parallel version of this pipeline far more slowly (~20 s here)
    train, _, info = make_loaders(fm600, batch_size=50, on_device=on_device, order="sequential", augment=True,
                                  num_workers=1)
    assert "pad-and-crop (pad 4) + horizontal flip" in info.train_augmentation
    pixels, _, _, mean, std = reference(fm600, "train")
    images, labels = next(iter(train))
    check_batch_format(images, labels, 3, 28)
    restored = np.rint(images.permute(0, 2, 3, 1).numpy() * std + mean).astype(np.int64)
    # the zero fill of pad-and-crop becomes (0 - mean) / std; restored it is 0 again
    changed = 0
    for i in range(len(restored)):
        assert _matches_shift_flip(restored[i], pixels[i].astype(np.int64), 4), f"image {i}"
        changed += not np.array_equal(restored[i], pixels[i])
    assert changed > 25  # most images really are augmented


@pytest.mark.parametrize("on_device", [False, True])
def test_one_channel_and_resize_on_device(fm600, on_device):
    train, val, info = make_loaders(fm600, batch_size=40, resolution=32, in_channels=1, on_device=on_device,
                                    order="sequential", augment=False, num_workers=1)
    assert info.resolution == [32, 32] and info.in_channels == 1
    images, labels = next(iter(val))
    check_batch_format(images, labels, 1, 32)
    _, expected, _, _, _ = reference(fm600, "val")
    resized = torch.nn.functional.interpolate(torch.from_numpy(expected[:40, ..., :1]).permute(0, 3, 1, 2).float(),
                                              size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(images, resized, atol=1e-4)


def test_auto_picks_on_device_when_the_dataset_fits(fm600, monkeypatch):
    _, _, info = make_loaders(fm600, batch_size=100, num_workers=1)
    assert info.implementation == "on-device" and "fits on cpu" in info.reason
    monkeypatch.setattr(loaders_module, "ON_DEVICE_MAX_BYTES", 1000)
    train, _, info = make_loaders(fm600, batch_size=100, num_workers=1)
    assert info.implementation == "ffcv" and "over the 0 MiB on-device budget" in info.reason
    assert "ffcv loader" in str(info) and len(train) == 6


@pytest.mark.parametrize("on_device", [False, True])
def test_random_order_follows_the_seed(rgb_dir, on_device):
    def epochs(seed):
        train, _, _ = make_loaders(rgb_dir, batch_size=32, on_device=on_device, seed=seed, num_workers=1,
                                   augment=False)  # the order does not depend on augmentation; compiles faster
        return [collect(train)[1] for _ in range(2)]

    first, again, other = epochs(3), epochs(3), epochs(4)
    assert len(first[0]) == 192  # drop_last: 6 full batches of 32
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[0], other[0])


@pytest.mark.parametrize("on_device", [False, True])
def test_set_epoch_fixes_a_pass_whatever_was_iterated_before(rgb_dir, on_device):
    """The seed rule's data side: epoch e is the same pass on every loader of the seed, however often (or how far)
    it was iterated before (adaptive BN and shape probes iterate it too)."""
    def loader():
        return make_loaders(rgb_dir, batch_size=32, on_device=on_device, seed=5, num_workers=1, augment=on_device)[0]

    fresh, used = loader(), loader()
    for _ in range(3):
        next(iter(used))  # partial passes
    collect(used)
    fresh.set_epoch(2)
    used.set_epoch(2)
    (x1, y1), (x2, y2) = collect(fresh), collect(used)
    assert torch.equal(y1, y2) and torch.equal(x1, x2)
    used.set_epoch(1)
    assert not torch.equal(collect(used)[1], y1)


def test_device_loader_shards_like_distributed_sampler(monkeypatch):
    import nps.datasets.device_loader as device_module

    images = torch.zeros((11, 4, 4, 3), dtype=torch.uint8)
    labels = torch.arange(11)
    seen = []
    for rank in range(3):
        monkeypatch.setattr(device_module, "_rank_and_world", lambda distributed, r=rank: (r, 3))
        loader = DeviceLoader(images, labels, batch_size=2, finisher=lambda x: x, augment=False, drop_last=False,
                              distributed=True, seed=1)
        assert loader.num_samples == 4 and len(loader) == 2
        seen.append(torch.cat([y for _, y in loader]))
    assert sorted(set(torch.cat(seen).tolist())) == list(range(11))  # 12 slots: one sample is repeated


def test_large_images_use_random_resized_crop_and_center_crop(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    colors = {}
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / "tree" / split / name).mkdir(parents=True)
            for i in range(6):
                color = rng.integers(0, 256, 3, dtype=np.uint8)
                Image.fromarray(np.broadcast_to(color, (96, 120, 3)).copy()).save(
                    tmp_path / "tree" / split / name / f"{i}.jpg", quality=95)
                colors[(split, name, i)] = color
    meta = convert_dataset("imagefolder", tmp_path / "out", src=tmp_path / "tree", write_mode="jpg", workers=1)
    train, val, info = make_loaders(tmp_path / "out", batch_size=4, resolution=64, num_workers=1, order="sequential")
    assert info.implementation == "ffcv" and "larger than 64 px" in info.reason
    assert info.train_augmentation.startswith("RandomResizedCrop to 64x64")
    images, labels = next(iter(train))
    check_batch_format(images, labels, 3, 64)
    images, labels = collect(val)
    check_batch_format(images, labels, 3, 64)
    mean, std = np.array(meta["mean"]), np.array(meta["std"])
    expected = np.stack([colors[("val", name, i)] for name in ("a", "b") for i in range(6)])
    restored = images.mean(dim=(2, 3)).numpy() * std + mean  # a uniform image stays uniform through the crop
    assert np.abs(restored - expected).max() <= 4  # JPEG of a flat color is nearly exact


def test_bad_arguments(fm600, tmp_path):
    with pytest.raises(DatasetError, match="meta.json: missing"):
        make_loaders(tmp_path / "nothing", batch_size=8)
    with pytest.raises(DatasetError, match="order 'shuffled'"):
        make_loaders(fm600, batch_size=8, order="shuffled")
    with pytest.raises(DatasetError, match="in_channels 2"):
        make_loaders(fm600, batch_size=8, in_channels=2)
