"""Input transform of raw crops: arcsinh, then per-channel scaling to [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class CropTransform(nn.Module):
    """Arcsinh-transform raw intensities and scale each channel to [-1, 1].

    ``y = clip(2 * (asinh(x / cofactor) - low) / (high - low) - 1, -1, 1)`` per channel, where
    ``low`` and ``high`` are percentiles of the transformed intensities of control cells. The
    statistics are buffers, so they are saved and loaded with the model.

    Parameters
    ----------
    n_channels
        Number of image channels.
    cofactor
        Arcsinh cofactor; intensities well above it are compressed logarithmically.
    """

    def __init__(self, n_channels: int, *, cofactor: float = 1.0) -> None:
        super().__init__()
        self.cofactor = float(cofactor)
        self.register_buffer("low", torch.zeros(n_channels, 1, 1))
        self.register_buffer("high", torch.ones(n_channels, 1, 1))

    @torch.no_grad()
    def fit(self, crops: np.ndarray, *, percentiles: tuple[float, float] = (0.5, 99.5)) -> None:
        """Set ``low``/``high`` from raw crops of shape (N, C, H, W) (control cells)."""
        values = np.arcsinh(np.asarray(crops, dtype=np.float32) / self.cofactor)
        per_channel = values.transpose(1, 0, 2, 3).reshape(values.shape[1], -1)
        low, high = np.percentile(per_channel, percentiles, axis=1)
        high = np.maximum(high, low + 1e-3)
        self.low.copy_(torch.as_tensor(low, dtype=torch.float32).view(-1, 1, 1))
        self.high.copy_(torch.as_tensor(high, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Transform raw crops (B, C, H, W) to [-1, 1]."""
        y = torch.asinh(x.float() / self.cofactor)
        return (2 * (y - self.low) / (self.high - self.low) - 1).clamp(-1.0, 1.0)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Map transformed crops back to the raw intensity scale."""
        return self.cofactor * torch.sinh((y + 1) / 2 * (self.high - self.low) + self.low)
