"""Channel alignment and intensity clipping of multichannel images."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import fft, ndimage
from skimage.registration import phase_cross_correlation

logger = logging.getLogger(__name__)


def _fourier_shift(spectrum: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Shift an image given its 2-D spectrum by ``shift`` (rows, columns), sub-pixel exact."""
    shifted = ndimage.fourier_shift(spectrum, [float(s) for s in shift])
    return fft.ifft2(shifted).real.astype(np.float32, copy=False)


def _fill_wrapped_border(channel: np.ndarray, shift: np.ndarray) -> None:
    """Replace the strips a circular shift wrapped around with the nearest valid row/column."""
    rows, cols = channel.shape
    dy, dx = (int(math.ceil(abs(float(s)))) for s in shift)
    dy, dx = min(dy, rows - 1), min(dx, cols - 1)
    if dy and shift[0] > 0:
        channel[:dy] = channel[dy]
    elif dy:
        channel[rows - dy :] = channel[rows - dy - 1]
    if dx and shift[1] > 0:
        channel[:, :dx] = channel[:, dx : dx + 1]
    elif dx:
        channel[:, cols - dx :] = channel[:, cols - dx - 1 : cols - dx]


def align_channels(
    image: np.ndarray,
    *,
    reference_channel: int = 0,
    upsample_factor: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Align every channel of an image to a reference channel by phase cross-correlation.

    Shifts are estimated with :func:`skimage.registration.phase_cross_correlation` to
    ``1 / upsample_factor`` pixel and applied in Fourier space, so sub-pixel shifts are exact for
    band-limited images. Pixels that the shift moves in from outside the image are filled with
    the nearest valid row or column.

    Parameters
    ----------
    image
        Channel-first image of shape ``(channels, height, width)``.
    reference_channel
        Index of the channel the others are aligned to.
    upsample_factor
        Sub-pixel precision of the shift estimate: 10 gives 0.1 px.

    Returns
    -------
    The aligned image as float32, and the applied shifts, shape ``(channels, 2)`` as
    ``(rows, columns)`` (zero for the reference channel).

    Examples
    --------
    >>> import numpy as np
    >>> from mcvi_ops.pp import align_channels
    >>> rng = np.random.default_rng(0)
    >>> image = np.stack([rng.random((64, 64))] * 2)
    >>> image[1] = np.roll(image[1], 3, axis=0)
    >>> aligned, shifts = align_channels(image)
    >>> shifts[1].round(1).tolist()
    [-3.0, 0.0]
    """
    image = np.asarray(image)
    if image.ndim != 3:
        msg = f"Expected a channel-first image (channels, height, width), got shape {image.shape}."
        raise ValueError(msg)
    n_channels = image.shape[0]
    if not 0 <= reference_channel < n_channels:
        msg = (
            f"reference_channel={reference_channel} is out of range for an image with "
            f"{n_channels} channels; pass an index in [0, {n_channels - 1}]."
        )
        raise ValueError(msg)
    out = image.astype(np.float32, copy=True)
    shifts = np.zeros((n_channels, 2), dtype=np.float64)
    if n_channels == 1:
        return out, shifts
    reference = fft.fft2(out[reference_channel])
    for c in range(n_channels):
        if c == reference_channel:
            continue
        moving = fft.fft2(out[c])
        shift, _, _ = phase_cross_correlation(
            reference, moving, upsample_factor=upsample_factor, space="fourier"
        )
        shift = np.asarray(shift, dtype=np.float64)
        shifts[c] = shift
        if np.any(shift != 0):
            out[c] = _fourier_shift(moving, shift)
            _fill_wrapped_border(out[c], shift)
    return out, shifts


def clip_percentiles(
    image: np.ndarray, percentiles: Sequence[float] | None, *, copy: bool = True
) -> np.ndarray:
    """Clip each channel of a channel-first image to its own lower and upper percentiles.

    Parameters
    ----------
    image
        Channel-first image ``(channels, height, width)``.
    percentiles
        ``(low, high)`` in percent, e.g. ``(0.1, 99.9)`` clips each channel's darkest and
        brightest 0.1% of pixels; `None` returns the image unchanged.
    copy
        Clip a copy rather than in place.

    Returns
    -------
    The clipped image (same dtype).

    Examples
    --------
    >>> import numpy as np
    >>> from mcvi_ops.pp import clip_percentiles
    >>> image = np.arange(1000, dtype=np.float32).reshape(1, 10, 100)
    >>> bool(clip_percentiles(image, (1, 99)).max() < 999)
    True
    """
    if percentiles is None:
        return image
    low, high = _check_percentiles(percentiles)
    out = image.copy() if copy else image
    for c in range(out.shape[0]):
        lo, hi = np.percentile(out[c], [low, high])
        np.maximum(out[c], out.dtype.type(lo), out=out[c])
        np.minimum(out[c], out.dtype.type(hi), out=out[c])
    return out


def _check_percentiles(percentiles: Sequence[float]) -> tuple[float, float]:
    try:
        low, high = (float(p) for p in percentiles)
    except (TypeError, ValueError) as err:
        msg = f"clip_percentiles must be a pair (low, high) in percent, got {percentiles!r}."
        raise ValueError(msg) from err
    if not 0 <= low < high <= 100:
        msg = (
            f"clip_percentiles must satisfy 0 <= low < high <= 100, got ({low}, {high}); e.g. "
            "(0.1, 99.9) clips the darkest and brightest 0.1%, or pass None to skip clipping."
        )
        raise ValueError(msg)
    return low, high
