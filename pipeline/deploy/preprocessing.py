"""What an exported subnetwork expects as input, and a module that prepares images that way.

nps's loaders (:mod:`nps.datasets.loaders`, :class:`~nps.datasets.batch_ops.BatchFinisher`) feed a network float32
``N x C x H x W`` batches normalised per channel with the **train split's mean and std on the 0–255 pixel scale**
(``meta.json`` of the converted dataset): ``x = (pixel - mean) / std``. An export carries that as a
``preprocessing`` dict (in the .pt and, as JSON and readable keys, in the ONNX file's ``metadata_props``)::

    {"mean": [...], "std": [...],            # one value per input channel, 0-255 scale (std >= 1e-6)
     "scale": "0-255",                        # pixels as uint8 values, not divided by 255
     "input_size": [C, H, W], "channel_order": "RGB" | "gray", "layout": "NCHW", "dtype": "float32",
     "formula": "...", "val_transform": "...", "resize": "bilinear" | "none" | "center_crop",
     "luma": [0.299, 0.587, 0.114],           # gray only: how nps turns the stored RGB into the one channel
     "dataset_mean": [r, g, b], "dataset_std": [r, g, b], "dataset_image_shape": [H, W] | None}

A one-channel network (``in_channels = 1``) takes the BT.601 luma of the stored RGB image (exact for grayscale,
which nps stores as three equal channels), so its mean and std are the luma-weighted sums of the three channels'.

:class:`Preprocess` applies the dict to uint8 (or float 0–255) images exactly as the loaders do (the same float32
operations, so the same tensors); :class:`PreprocessedSubnetwork` puts it in front of a network.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from nps.datasets.batch_ops import LUMA
from nps.pipeline.errors import NpsError

# The loaders' rules (nps.datasets.loaders): images up to this side are used as stored (resized on the device when
# the network's resolution differs); larger ones are center-cropped by this ratio and resized while decoded.
SMALL_IMAGE_MAX_SIDE = 64
VAL_CENTER_CROP_RATIO = 224 / 256
MIN_STD = 1e-6  # BatchFinisher's clamp
FORMULA = "x = (pixel - mean) / std per channel, pixel on the 0-255 scale (uint8 values as float32)"
# The readable ONNX metadata keys (beside "nps_preprocessing", the whole dict as JSON).
ONNX_KEYS = ("mean", "std", "scale", "input_size", "channel_order", "layout", "formula", "val_transform")


def channel_stats(mean, std, in_channels: int) -> tuple[list[float], list[float]]:
    """The per-input-channel mean and std the loaders normalise with, in float64 as BatchFinisher computes them."""
    mean_t, std_t = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    if in_channels == 1:
        weights = torch.tensor(LUMA, dtype=torch.float64)
        mean_t, std_t = (mean_t * weights).sum().reshape(1), (std_t * weights).sum().reshape(1)
    return mean_t.tolist(), std_t.clamp_min(MIN_STD).tolist()


def val_transform(image_shape, resolution: int) -> tuple[str, str]:
    """(resize kind, description) of what the val loader does to a stored image before normalising."""
    r = int(resolution)
    if image_shape and max(image_shape) <= SMALL_IMAGE_MAX_SIDE:
        h, w = (int(v) for v in image_shape)
        if (h, w) == (r, r):
            return "none", f"the {h}x{w} image as stored by nps convert"
        return "bilinear", (f"the {h}x{w} image as stored by nps convert, normalised, then resized to {r}x{r} "
                            f"(bilinear, antialiased when shrinking)")
    return "center_crop", (f"center square of int({VAL_CENTER_CROP_RATIO:g} x the shorter side), resized to {r}x{r} "
                           "(OpenCV INTER_AREA, on the uint8 image), then normalised")


def make_preprocessing(dataset_mean, dataset_std, image_shape, *, resolution: int, in_channels: int) -> dict:
    """The ``preprocessing`` dict of a network that takes ``in_channels`` x ``resolution``² inputs, trained on a
    dataset with these per-RGB-channel ``mean``/``std`` (0–255) and stored ``image_shape`` (``[H, W]`` or None)."""
    if len(dataset_mean) != 3 or len(dataset_std) != 3:
        raise NpsError(f"the dataset's mean {list(dataset_mean)} / std {list(dataset_std)}: expected three values "
                       "each (RGB, 0-255); re-convert the dataset with nps convert")
    mean, std = channel_stats(dataset_mean, dataset_std, int(in_channels))
    resize, description = val_transform(image_shape, resolution)
    gray = int(in_channels) == 1
    out = {"mean": mean, "std": std, "scale": "0-255",
           "input_size": [int(in_channels), int(resolution), int(resolution)],
           "channel_order": "gray" if gray else "RGB", "layout": "NCHW", "dtype": "float32", "formula": FORMULA,
           "val_transform": description, "resize": resize,
           "dataset_mean": [float(v) for v in dataset_mean], "dataset_std": [float(v) for v in dataset_std],
           "dataset_image_shape": [int(v) for v in image_shape] if image_shape else None}
    if gray:
        out["luma"] = list(LUMA)
    return out


def onnx_metadata(preprocessing: dict) -> list[tuple[str, str]]:
    """``metadata_props`` entries: the dict as JSON under ``nps_preprocessing``, and readable keys (lists as
    JSON, strings as they are)."""
    entries = [("nps_preprocessing", json.dumps(preprocessing))]
    for key in ONNX_KEYS:
        value = preprocessing[key]
        entries.append((key, value if isinstance(value, str) else json.dumps(value)))
    return entries


class Preprocess(nn.Module):
    """uint8 (or float, 0–255) images ``N x C' x H x W`` -> the normalised float32 batch the network was evaluated
    on (channels_last memory, as the loaders emit it).

    ``C'`` may be the network's channel count, or 3 for a one-channel network (the BT.601 luma, as nps does), or 1
    for a three-channel one (replicated, as nps stores grayscale). Images of another size are resized (bilinear,
    after normalising) when the dataset's images were small and nps resized them the same way; images for a
    center-cropped dataset must be cropped and resized beforehand (``preprocessing["val_transform"]``).
    """

    def __init__(self, preprocessing: dict):
        super().__init__()
        self.preprocessing = dict(preprocessing)
        mean = torch.tensor(preprocessing["mean"], dtype=torch.float64)
        std = torch.tensor(preprocessing["std"], dtype=torch.float64).clamp_min(MIN_STD)
        self.channels, self.height, self.width = (int(v) for v in preprocessing["input_size"])
        if len(mean) != self.channels or len(std) != self.channels:
            raise NpsError(f"preprocessing: {len(mean)} means and {len(std)} stds for {self.channels} input "
                           "channels; re-export the subnetwork")
        # scale and shift computed in float64, applied in float32: BatchFinisher's arithmetic, so the same tensors
        self.register_buffer("scale", (1.0 / std).float().reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean / std).float().reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("luma", torch.tensor(LUMA, dtype=torch.float32).reshape(3, 1), persistent=False)
        self.resize = str(preprocessing.get("resize", "none"))

    def _channels(self, images: torch.Tensor) -> torch.Tensor:
        n, c, h, w = images.shape
        if c == self.channels:
            return images.float()
        if c == 3 and self.channels == 1:  # one gemv over the pixels, as BatchFinisher computes the luma
            pixels = images.permute(0, 2, 3, 1).reshape(-1, 3).float()
            return (pixels @ self.luma).reshape(n, h, w, 1).permute(0, 3, 1, 2)
        if c == 1 and self.channels == 3:
            return images.float().expand(n, 3, h, w)
        raise NpsError(f"images with {c} channels; the network takes {self.channels} "
                       f"({self.preprocessing.get('channel_order')}), or 3 (RGB)")

    def forward(self, images) -> torch.Tensor:
        images = torch.as_tensor(images, device=self.scale.device)
        if images.dim() != 4:
            raise NpsError(f"images of shape {tuple(images.shape)}: expected a batch N x C x H x W (NCHW), pixel "
                           "values 0-255")
        x = self._channels(images) * self.scale + self.shift
        h, w = x.shape[-2:]
        if (h, w) != (self.height, self.width):
            if self.resize != "bilinear":
                raise NpsError(f"images of {h}x{w}; the network takes {self.height}x{self.width}: prepare them as "
                               f"nps did ({self.preprocessing.get('val_transform')})")
            down = h > self.height or w > self.width
            x = F.interpolate(x, size=(self.height, self.width), mode="bilinear", align_corners=False,
                              antialias=down)
        return x.contiguous(memory_format=torch.channels_last)


class PreprocessedSubnetwork(nn.Module):
    """``network(preprocess(images))``: an exported subnetwork that takes images as stored (0–255, NCHW)."""

    def __init__(self, network: nn.Module, preprocessing: dict):
        super().__init__()
        self.preprocess = Preprocess(preprocessing)
        self.network = network
        self.preprocessing = self.preprocess.preprocessing

    def forward(self, images) -> torch.Tensor:
        return self.network(self.preprocess(images))
