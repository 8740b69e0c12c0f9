"""The last steps of every loader, run on the target device: uint8 -> float, normalize, resize, channel count.

Both loader implementations (FFCV and on-device) hand a uint8 ``N x 3 x H x W`` channels_last batch to
:class:`BatchFinisher`, so their outputs are identical in type, layout and scale.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

# ITU-R BT.601 luma: exact for grayscale stored as three equal channels (the weights sum to 1).
LUMA = (0.299, 0.587, 0.114)


class BatchFinisher:
    """uint8 NCHW (channels_last) batch -> normalized float NCHW channels_last on ``device``.

    Parameters
    ----------
    mean, std : sequence of 3 floats
        Per-channel statistics on the 0..255 scale.
    device : torch.device
        Where the batch already is (the work happens there).
    resolution : int, optional
        Resize (bilinear) to ``resolution x resolution`` when the batch has another size; ``None`` keeps it.
    in_channels : int
        3, or 1 to reduce to luma (the model takes one channel).
    dtype : torch.dtype
        Output floating type.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, device: torch.device,
                 resolution: Optional[int] = None, in_channels: int = 3, dtype: torch.dtype = torch.float32):
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        mean_t = torch.tensor(mean, dtype=torch.float64)
        std_t = torch.tensor(std, dtype=torch.float64)
        self.luma = None
        if in_channels == 1:
            weights = torch.tensor(LUMA, dtype=torch.float64)
            mean_t, std_t = (mean_t * weights).sum().reshape(1), (std_t * weights).sum().reshape(1)
            self.luma = weights.to(dtype).reshape(3, 1).to(device)
        std_t = std_t.clamp_min(1e-6)
        self.scale = (1.0 / std_t).to(dtype).to(device)
        self.shift = (-mean_t / std_t).to(dtype).to(device)
        self.channels = in_channels
        self.resolution = resolution
        self.dtype = dtype
        self.device = device
        self._rows = {}

    def _affine_rows(self, pixels: int):
        # The per-channel scale/shift tiled over one image's H*W pixels: broadcasting a length-3 vector over a
        # channels_last tensor is more than 10x slower on CPU than one long contiguous row.
        if pixels not in self._rows:
            self._rows[pixels] = (self.scale.repeat(pixels), self.shift.repeat(pixels))
        return self._rows[pixels]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n, c, h, w = images.shape
        pixels = images.permute(0, 2, 3, 1)  # N x H x W x 3, contiguous for a channels_last batch
        if not pixels.is_contiguous():
            pixels = pixels.contiguous()
        if self.luma is not None:
            x = pixels.reshape(-1, c).to(self.dtype) @ self.luma  # one gemv: luma
            x = x.reshape(n, -1)
        else:
            x = pixels.reshape(n, -1).to(self.dtype, copy=True)  # fresh: never touch the loader's buffer
        scale, shift = self._affine_rows(h * w)
        x.mul_(scale).add_(shift)
        x = x.view(n, h, w, self.channels).permute(0, 3, 1, 2)  # NCHW view, channels_last memory
        if self.resolution is not None and (h, w) != (self.resolution, self.resolution):
            down = h > self.resolution or w > self.resolution
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False,
                              antialias=down)
        return x.contiguous(memory_format=torch.channels_last)
