"""Input transform of raw crops: arcsinh, then per-channel scaling to [-1, 1]."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

#: a control cell whose own intensity percentiles sit this far (in arcsinh units, ~ln(100): 100x
#: the intensity) beyond the typical cell's is an artefact (saturated or corrupt crop), not biology
_EXTREME_CELL = float(np.log(100.0))
#: ... or this many robust standard deviations (MAD * 1.4826), whichever is larger
_EXTREME_MADS = 8.0


def _percentile(values: np.ndarray, q, axis=None) -> np.ndarray:
    """Percentiles ignoring NaN, without the cost of ``nanpercentile`` when there is none."""
    if np.isnan(values).any():
        return np.nanpercentile(values, q, axis=axis)
    return np.percentile(values, q, axis=axis)


def _extreme_cells(per_cell: np.ndarray) -> np.ndarray:
    """Cells (N,) of one channel whose per-cell statistic (N,) is far from the typical cell's."""
    finite = np.isfinite(per_cell)
    if finite.sum() < 3:
        return np.zeros(per_cell.shape, dtype=bool)
    median = np.median(per_cell[finite])
    spread = 1.4826 * np.median(np.abs(per_cell[finite] - median))
    limit = max(_EXTREME_MADS * spread, _EXTREME_CELL)
    with np.errstate(invalid="ignore"):
        return np.abs(per_cell - median) > limit


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

    Examples
    --------
    >>> import numpy as np
    >>> transform = CropTransform(2)
    >>> crops = np.random.default_rng(0).integers(0, 4000, (50, 2, 16, 16))
    >>> excluded = transform.fit(crops)
    >>> transform(torch.as_tensor(crops[:3])).shape
    torch.Size([3, 2, 16, 16])
    """

    def __init__(self, n_channels: int, *, cofactor: float = 1.0) -> None:
        super().__init__()
        self.cofactor = float(cofactor)
        self.register_buffer("low", torch.zeros(n_channels, 1, 1))
        self.register_buffer("high", torch.ones(n_channels, 1, 1))

    @torch.no_grad()
    def fit(
        self, crops: np.ndarray, *, percentiles: tuple[float, float] = (0.5, 99.5)
    ) -> np.ndarray:
        """Set ``low``/``high`` from raw crops of shape (N, C, H, W) (control cells).

        Robust to artefacts: the statistics are percentiles (never the minimum or maximum),
        NaN and infinite pixels are ignored, and cells whose own percentiles lie more than 100
        times (and 8 robust standard deviations) beyond the typical cell's, such as saturated or
        corrupt crops, are left out of a channel's statistics.

        Parameters
        ----------
        crops
            Raw crops of control cells, shape (N, C, H, W).
        percentiles
            Percentiles of the transformed intensities that map to -1 and 1.

        Returns
        -------
        Boolean mask (N,) of the cells left out of the statistics of at least one channel.
        """
        crops = np.asarray(crops)
        if crops.ndim != 4 or len(crops) == 0:
            msg = f"`crops` must have shape (N, C, H, W) with N >= 1, got {crops.shape}."
            raise ValueError(msg)
        with np.errstate(over="ignore", invalid="ignore"):
            values = np.arcsinh(crops.astype(np.float32) / self.cofactor)
        values[~np.isfinite(values)] = np.nan
        n_cells, n_channels = values.shape[:2]
        per_cell = values.reshape(n_cells, n_channels, -1)
        low, high = np.empty(n_channels), np.empty(n_channels)
        excluded = np.zeros(n_cells, dtype=bool)
        for channel in range(n_channels):
            pixels = per_cell[:, channel]
            with warnings.catch_warnings():  # all-NaN cells give NaN statistics, never extreme
                warnings.simplefilter("ignore", RuntimeWarning)
                cell_low, cell_high = _percentile(pixels, percentiles, axis=1)
            extreme = _extreme_cells(cell_low) | _extreme_cells(cell_high)
            kept = pixels[~extreme]
            if not np.isfinite(kept).any():
                msg = (
                    f"Channel {channel} of the control crops holds no finite pixel value, so it "
                    "cannot be scaled. Check the crops (they may be all NaN or infinite)."
                )
                raise ValueError(msg)
            low[channel], high[channel] = _percentile(kept, percentiles)
            excluded |= extreme
        high = np.maximum(high, low + 1e-3)
        self.low.copy_(torch.as_tensor(low, dtype=torch.float32).view(-1, 1, 1))
        self.high.copy_(torch.as_tensor(high, dtype=torch.float32).view(-1, 1, 1))
        if excluded.any():
            logger.info(
                "Input scaling left out %d of %d control cells with extreme intensities.",
                int(excluded.sum()),
                n_cells,
            )
        return excluded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Transform raw crops (B, C, H, W) to [-1, 1]."""
        y = torch.asinh(x.float() / self.cofactor)
        return (2 * (y - self.low) / (self.high - self.low) - 1).clamp(-1.0, 1.0)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Map transformed crops back to the raw intensity scale."""
        return self.cofactor * torch.sinh((y + 1) / 2 * (self.high - self.low) + self.low)
