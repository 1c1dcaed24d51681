"""Reading microscope images and per-cell image files: the formats, not the processing."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".npy")
ChannelAxis = int | Literal["first", "last"]


class MissingTileError(LookupError):
    """A tile named by the cell table has no image."""


def image_files(folder: Path) -> list[Path]:
    """Image files of a folder (by suffix), sorted by name."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)
    )


def stem(path: Path) -> str:
    """File name without its image suffix (``.ome.tif`` counts as one)."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


class UnreadableImageError(OSError):
    """An image file exists but cannot be read: corrupt, truncated or not an image."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a TIFF/OME-TIFF (first series) or ``.npy`` image.

    Parameters
    ----------
    path
        A ``.tif``/``.tiff``/``.ome.tif`` or ``.npy`` file.

    Returns
    -------
    The pixels as an array. A file that exists but cannot be decoded (corrupt, truncated)
    raises :class:`~mcvi_ops.io.UnreadableImageError` naming it.

    Examples
    --------
    >>> import mcvi_ops
    >>> image = mcvi_ops.io.read_image("tile.tif")  # doctest: +SKIP
    """
    path = os.fspath(path)
    try:
        if path.lower().endswith(".npy"):
            return np.load(path, allow_pickle=False)
        import tifffile

        return tifffile.imread(path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, IndexError, KeyError, TypeError) as err:
        msg = (
            f"Cannot read the image file {path!r}: {type(err).__name__}: {err}. It may be corrupt "
            "or truncated (e.g. an interrupted copy); replace it, or leave it out (extract_crops, "
            "crops_from_files and read_crop_folder skip such files with on_error='skip')."
        )
        raise UnreadableImageError(msg) from err


def to_channel_first(
    image: np.ndarray, *, channel_axis: ChannelAxis, n_channels: int, where: str
) -> np.ndarray:
    """Move the channel axis first and check the channel count."""
    image = np.asarray(image)
    while image.ndim > 3 and image.shape[0] == 1:
        image = image[0]
    if image.ndim == 2 and n_channels == 1:
        return image[None]
    axis = {"first": 0, "last": -1}.get(channel_axis, channel_axis)  # type: ignore[arg-type]
    if image.ndim != 3:
        msg = (
            f"{where} has shape {image.shape}; expected a 3-D multichannel image "
            f"(channels, height, width) or (height, width, channels) with {n_channels} channels."
        )
        raise ValueError(msg)
    if image.shape[axis] != n_channels:
        msg = (
            f"{where} has shape {image.shape}: with channel_axis={channel_axis!r} that is "
            f"{image.shape[axis]} channels, but {n_channels} channel names were given. Set "
            "channel_axis ('first' for (C, Y, X), 'last' for (Y, X, C)) or fix channel_names."
        )
        raise ValueError(msg)
    return np.moveaxis(image, axis, 0)
