"""Finding, loading and cropping one tile: the unit of work of :func:`extract_crops`."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mcvi_ops.io._images import (
    IMAGE_SUFFIXES,
    ChannelAxis,
    MissingTileError,
    image_files,
    read_image,
    stem,
    to_channel_first,
)

from ._align import align_channels, clip_percentiles
from ._resize import cast_crops, resize_crops

logger = logging.getLogger(__name__)

@dataclass
class TileTask:
    """Everything a worker needs to crop one tile (picklable)."""

    index: int
    label: str
    key: Any
    source: Any  # ndarray, path string, or (callable, key)
    positions: np.ndarray  # row positions of the tile's cells in the table
    y: np.ndarray
    x: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TileResult:
    """Crops of one tile, and what happened to its cells."""

    index: int
    crops: np.ndarray
    kept: np.ndarray  # table row positions, in table order
    centres: np.ndarray  # (n_kept, 2) rounded centroid (row, column) in the tile
    n_dropped_edge: int
    missing: bool
    shifts: list[list[float]]
    tile_shape: list[int]


def tile_label(names: Sequence[str], key: Any) -> str:
    """Name a tile readably, e.g. ``"well='A1', tile=3"``."""
    if not names:
        return "the image"
    values = key if isinstance(key, tuple) else (key,)
    return ", ".join(f"{n}={v!r}" for n, v in zip(names, values, strict=True))


def resolve_sources(tiles: Any, names: Sequence[str], keys: list[Any]) -> tuple[list[Any], str]:
    """Find the image source of every tile key; `None` marks a tile without an image.

    Returns the sources and a description of how tiles were given.
    """
    if isinstance(tiles, np.ndarray):
        if len(keys) != 1:
            msg = (
                f"One image array was given but the cells come from {len(keys)} tiles "
                f"({tile_label(names, keys[0])}, ...). Pass a mapping or callable from tile key "
                "to image, or a path template like 'images/{well}_{tile}.tif'."
            )
            raise ValueError(msg)
        return [tiles], "array"
    if callable(tiles) and not isinstance(tiles, Mapping):
        return [(tiles, key) for key in keys], "callable"
    if isinstance(tiles, Mapping):
        return [tiles.get(key) for key in keys], "mapping"
    if isinstance(tiles, str | os.PathLike):
        text = os.fspath(tiles)
        if "{" in text:
            sources = []
            for key in keys:
                values = key if isinstance(key, tuple) else (key,)
                fields = dict(zip(names, values, strict=True))
                try:
                    path = Path(text.format(**fields))
                except (KeyError, IndexError) as err:
                    msg = (
                        f"The tile path template {text!r} uses a field {err} that is not a tile "
                        f"key column; tile keys are {list(names)}. Use only those names in "
                        "braces, or set `tile_key=`."
                    )
                    raise KeyError(msg) from err
                sources.append(str(path) if path.exists() else None)
            return sources, "template"
        path = Path(text)
        if path.is_dir():
            files = image_files(path)
            if not files:
                msg = f"The tile folder {text!r} holds no .tif/.tiff/.npy images."
                raise FileNotFoundError(msg)
            if len(files) == 1 and len(keys) == 1:
                return [str(files[0])], "folder"
            by_stem = {stem(p): str(p) for p in files}
            sources = []
            for key in keys:
                values = key if isinstance(key, tuple) else (key,)
                sources.append(by_stem.get("_".join(str(v) for v in values)))
            return sources, "folder"
        if path.is_file():
            if len(keys) != 1:
                msg = (
                    f"One image file {text!r} was given but the cells come from {len(keys)} "
                    "tiles. Pass a folder, a path template like 'images/{well}_{tile}.tif', or "
                    "a mapping from tile key to path."
                )
                raise ValueError(msg)
            return [str(path)], "file"
        msg = (
            f"Tile image path {text!r} does not exist. Pass an existing file, a folder of "
            "TIFFs, or a template with tile key columns in braces like 'tiles/{tile}.tif'."
        )
        raise FileNotFoundError(msg)
    if isinstance(tiles, Sequence) and not isinstance(tiles, str | bytes):
        if len(tiles) != len(keys):
            msg = (
                f"Got {len(tiles)} tile images for {len(keys)} tiles in the cell table. A list "
                "is matched to the tile keys in sorted order, so give one per tile, or pass a "
                "mapping from tile key to image."
            )
            raise ValueError(msg)
        return [os.fspath(t) if isinstance(t, os.PathLike) else t for t in tiles], "sequence"
    msg = (
        f"Cannot use {type(tiles).__name__} as tiles. Pass a path, a folder, a path template, "
        "an array, a list, a mapping or a callable from tile key to image."
    )
    raise TypeError(msg)


def _load(task: TileTask) -> np.ndarray | None:
    source = task.source
    if isinstance(source, tuple) and len(source) == 2 and callable(source[0]):
        loader, key = source
        try:
            source = loader(key)
        except (KeyError, FileNotFoundError) as err:
            logger.debug("Tile loader found no image for %s: %r", task.label, err)
            return None
    if source is None:
        return None
    if isinstance(source, str | os.PathLike):
        if not Path(source).exists():
            return None
        return read_image(source)
    return np.asarray(source)


def crop_windows(
    image: np.ndarray, rows: np.ndarray, cols: np.ndarray, crop_size: int
) -> np.ndarray:
    """Cut ``crop_size`` squares centred on integer pixel positions, zero-padding at the edges."""
    n_channels, height, width = image.shape
    half = crop_size // 2
    top, left = rows - half, cols - half
    out = np.zeros((len(rows), n_channels, crop_size, crop_size), dtype=image.dtype)
    inside = (top >= 0) & (left >= 0) & (top + crop_size <= height) & (left + crop_size <= width)
    for i in np.flatnonzero(inside):
        t, l_ = int(top[i]), int(left[i])
        out[i] = image[:, t : t + crop_size, l_ : l_ + crop_size]
    for i in np.flatnonzero(~inside):
        t, l_ = int(top[i]), int(left[i])
        t0, l0 = max(t, 0), max(l_, 0)
        t1, l1 = min(t + crop_size, height), min(l_ + crop_size, width)
        if t1 > t0 and l1 > l0:
            out[i, :, t0 - t : t1 - t, l0 - l_ : l1 - l_] = image[:, t0:t1, l0:l1]
    return out


def process_tile(task: TileTask) -> TileResult:
    """Load, align, clip and crop one tile (runs in a worker process)."""
    from threadpoolctl import threadpool_limits

    # the small matrix products of sub-pixel registration are slower on many BLAS threads, and
    # workers already run in parallel
    with threadpool_limits(limits=1, user_api="blas"):
        return _process_tile(task)


def _process_tile(task: TileTask) -> TileResult:
    p = task.params
    crop_size, out_size = p["crop_size"], p["resize_to"] or p["crop_size"]
    n_channels, dtype = p["n_channels"], np.dtype(p["dtype"])
    empty = np.zeros((0, n_channels, out_size, out_size), dtype=dtype)
    image = _load(task)
    if image is None:
        return TileResult(
            task.index, empty, task.positions[:0], np.zeros((0, 2), np.int64), 0, True, [], []
        )
    image = to_channel_first(
        image, channel_axis=p["channel_axis"], n_channels=n_channels, where=f"Tile {task.label}"
    )
    if np.issubdtype(dtype, np.integer) and not np.issubdtype(image.dtype, np.integer):
        msg = (
            f"Tile {task.label} holds {image.dtype} pixels but crops are written as {dtype}, "
            "which would round them. Pass dtype='float32'."
        )
        raise TypeError(msg)
    height, width = image.shape[1:]
    rows = np.floor(task.y + 0.5).astype(np.int64)
    cols = np.floor(task.x + 0.5).astype(np.int64)
    margin = p["edge_margin"]
    keep = (
        (rows >= margin) & (cols >= margin) & (height - rows >= margin) & (width - cols >= margin)
    )
    if p["align"]:
        image, shifts = align_channels(
            image, reference_channel=p["reference_channel"], upsample_factor=p["upsample_factor"]
        )
    else:
        shifts = np.zeros((n_channels, 2))
        if p["clip_percentiles"] is not None:
            image = image.astype(np.float32)  # a copy: never clip the caller's array in place
    if p["clip_percentiles"] is not None:
        image = clip_percentiles(image, p["clip_percentiles"], copy=False)
    if p["resize_to"]:
        crops = resize_crops(crop_windows(image, rows[keep], cols[keep], crop_size), out_size)
        crops = cast_crops(crops, dtype)
    else:  # cast the tile once: cheaper than casting overlapping crops
        crops = crop_windows(cast_crops(image, dtype), rows[keep], cols[keep], crop_size)
    return TileResult(
        index=task.index,
        crops=crops,
        kept=task.positions[keep],
        centres=np.stack([rows[keep], cols[keep]], axis=1),
        n_dropped_edge=int((~keep).sum()),
        missing=False,
        shifts=np.round(shifts, 4).tolist(),
        tile_shape=[int(height), int(width)],
    )
