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


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a TIFF/OME-TIFF (first series) or ``.npy`` image."""
    path = os.fspath(path)
    if path.lower().endswith(".npy"):
        return np.load(path)
    import tifffile

    return tifffile.imread(path)


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


