"""Finding, loading and cropping one tile: the unit of work of :func:`extract_crops`."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mcvi_ops.data._images import (
    ChannelAxis,
    UnreadableImageError,
    image_files,
    read_image,
    stem,
    to_channel_first,
)
from mcvi_ops.data._writer import check_channel_names

from ._align import _check_percentiles, align_channels, clip_percentiles
from ._resize import cast_crops, resize_crops

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CropParams:
    """How every tile of a run is cropped: checked once, picklable for workers.

    :meth:`record` is what the run log compares to resume a run and what
    ``.uns["extract_crops"]`` shows, so its keys and values keep their format.
    """

    crop_size: int
    resize_to: int | None
    edge_margin: int
    channel_names: list[str]
    channel_axis: ChannelAxis
    align: bool
    reference_channel: int
    upsample_factor: int
    clip_percentiles: list[float] | None
    dtype: str
    tile_key: list[str]
    y_key: str
    x_key: str
    preset: str | None
    on_missing_tile: Literal["raise", "skip"]
    on_error: Literal["raise", "skip"]
    nonfinite: Literal["raise", "zero"]

    @property
    def n_channels(self) -> int:
        """Channels of every tile and crop."""
        return len(self.channel_names)

    @property
    def out_size(self) -> int:
        """Side of the stored crops, after any resize."""
        return self.resize_to or self.crop_size

    def record(self) -> dict[str, Any]:
        """The parameters as plain data (JSON and ``.uns``), one key per field."""
        return dataclasses.asdict(self)


def checked_options(
    *,
    crop_size: int,
    resize_to: int | None,
    edge_margin: int | None,
    channel_names: Sequence[str],
    channel_axis: ChannelAxis,
    reference_channel: int | str,
    dtype: Any,
    clip_percentiles: tuple[float, float] | None,
    choices: dict[str, tuple[str, tuple[str, ...]]],
) -> dict[str, Any]:
    """The cropping options, checked before any file is read (fields of :class:`CropParams`)."""
    if int(crop_size) != crop_size or crop_size < 2:
        msg = f"crop_size must be an integer >= 2 pixels, got {crop_size!r} (e.g. crop_size=100)."
        raise ValueError(msg)
    if resize_to is not None and (int(resize_to) != resize_to or resize_to < 1):
        msg = f"resize_to must be a positive integer or None, got {resize_to!r} (e.g. 64)."
        raise ValueError(msg)
    if edge_margin is None:
        edge_margin = math.ceil(crop_size / 2)
    elif int(edge_margin) != edge_margin or edge_margin < 0:
        msg = f"edge_margin must be a non-negative integer or None, got {edge_margin!r}."
        raise ValueError(msg)
    names = check_channel_names(channel_names)
    if not names:
        msg = f"channel_names must be a list of names, one per channel, got {channel_names!r}."
        raise ValueError(msg)
    if channel_axis not in ("first", "last") and not isinstance(channel_axis, int):
        msg = f"channel_axis must be 'first', 'last' or an integer axis, got {channel_axis!r}."
        raise ValueError(msg)
    if isinstance(reference_channel, str):
        if reference_channel not in names:
            msg = (
                f"reference_channel {reference_channel!r} is not one of the channel names {names}."
            )
            raise ValueError(msg)
        reference = names.index(reference_channel)
    else:
        reference = int(reference_channel)
        if not 0 <= reference < len(names):
            msg = (
                f"reference_channel={reference_channel} is out of range for {len(names)} channels."
            )
            raise ValueError(msg)
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype("uint16"), np.dtype("float32")):
        msg = f"dtype must be 'uint16' or 'float32', got {dtype}."
        raise ValueError(msg)
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            msg = f"{name} must be one of {list(allowed)}, got {value!r}."
            raise ValueError(msg)
    if clip_percentiles is not None:
        clip_percentiles = list(_check_percentiles(clip_percentiles))
    return {
        "crop_size": int(crop_size),
        "resize_to": None if resize_to is None else int(resize_to),
        "edge_margin": int(edge_margin),
        "channel_names": [str(n) for n in channel_names],
        "channel_axis": channel_axis,
        "reference_channel": reference,
        "clip_percentiles": clip_percentiles,
        "dtype": str(dtype),
        **{name: value for name, (value, _) in choices.items()},
    }


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
    params: CropParams
    cell_ids: list[str] = field(default_factory=list)  # ids of the tile's cells, for errors


@dataclass
class TileResult:
    """Crops of one tile, and what happened to its cells."""

    index: int
    crops: np.ndarray | None  # None once written to a spill file
    n_crops: int
    n_dropped_edge: int
    missing: bool
    shifts: list[list[float]]
    tile_shape: list[int]
    unreadable: str | None = None  # why the image could not be read (on_error="skip")
    nonfinite: tuple[int, int] = (0, 0)  # NaN/inf pixels zeroed inside crops, cells holding them
    fingerprint: dict[str, Any] | None = None  # what was read, to notice later changes
    spill: str | None = None  # .npy file holding the crops (parallel runs)


def tile_label(names: Sequence[str], key: Any) -> str:
    """Name a tile readably, e.g. ``"well='A1', tile=3"``."""
    if not names:
        return "the image"
    values = key if isinstance(key, tuple) else (key,)
    return ", ".join(f"{n}={v!r}" for n, v in zip(names, values, strict=True))


def _template_folder(template: str) -> str:
    """The folder a path template's fixed part points into (its text before the first brace)."""
    head = template.split("{", 1)[0]
    folder = head if head.endswith(("/", os.sep)) else os.path.dirname(head)
    return os.path.normpath(os.path.abspath(folder or "."))


def _check_inside(template: str, fields: dict[str, Any], path: str, row: Any) -> None:
    """A tile path filled from the cell table must stay inside the template's folder."""
    folder = _template_folder(template)
    target = os.path.normpath(os.path.abspath(path))
    bad = [
        f"{name}={value!r}"
        for name, value in fields.items()
        if os.path.isabs(str(value)) or ".." in Path(str(value)).parts
    ]
    if bad or os.path.commonpath([folder, target]) != folder:
        msg = (
            f"Row {row!r} of the cell table fills the tile path template {template!r} with "
            f"{', '.join(bad) or fields} to {path!r}, which reaches outside the tile folder "
            f"{folder!r}. Tile key values must be plain names, not absolute paths or '..'; fix "
            "that row or put the folder into the template."
        )
        raise ValueError(msg)


def resolve_sources(
    tiles: Any, names: Sequence[str], keys: list[Any], rows: Sequence[Any] | None = None
) -> tuple[list[Any], str]:
    """Find the image source of every tile key; `None` marks a tile without an image.

    .. long function: documentation and signature; the body is under 80 lines.

    ``rows`` names a cell-table row of each tile, for errors. Returns the sources and a
    description of how tiles were given.
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
            for i, key in enumerate(keys):
                values = key if isinstance(key, tuple) else (key,)
                fields = dict(zip(names, values, strict=True))
                try:
                    filled = text.format(**fields)
                except (KeyError, IndexError) as err:
                    msg = (
                        f"The tile path template {text!r} uses a field {err} that is not a tile "
                        f"key column; tile keys are {list(names)}. Use only those names in "
                        "braces, or set `tile_key=`."
                    )
                    raise KeyError(msg) from err
                _check_inside(text, fields, filled, rows[i] if rows is not None else key)
                path = Path(filled)
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


def _is_loader(source: Any) -> bool:
    return isinstance(source, tuple) and len(source) == 2 and callable(source[0])


def source_fingerprint(source: Any) -> dict[str, Any] | None:
    """Identify a tile image so that a resumed run notices when it changed.

    Size and modification time of a file, a hash of an array; `None` for a loader (whose image
    is only known by calling it).
    """
    if _is_loader(source):
        return None
    if source is None:
        return {"missing": True}
    if isinstance(source, str | os.PathLike):
        try:
            stat = os.stat(source)
        except FileNotFoundError:
            return {"missing": True}
        return {"path": os.fspath(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    array = np.ascontiguousarray(source)
    digest = hashlib.blake2b(array.view(np.uint8).reshape(-1), digest_size=16).hexdigest()
    return {"blake2b": digest, "shape": list(array.shape), "dtype": str(array.dtype)}


def _load(task: TileTask) -> np.ndarray | None:
    source = task.source
    if _is_loader(source):
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


def window_counts(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray, size: int) -> np.ndarray:
    """Number of true pixels of a ``(height, width)`` count image inside each crop window."""
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = mask.cumsum(0).cumsum(1)
    half = size // 2
    top = np.clip(rows - half, 0, mask.shape[0])
    bottom = np.clip(rows - half + size, 0, mask.shape[0])
    left = np.clip(cols - half, 0, mask.shape[1])
    right = np.clip(cols - half + size, 0, mask.shape[1])
    return table[bottom, right] - table[top, right] - table[bottom, left] + table[top, left]


def _check_values(
    task: TileTask, image: np.ndarray, rows: np.ndarray, cols: np.ndarray, ids: list[str]
) -> tuple[np.ndarray, int, int]:
    """Catch NaN/inf pixels and values that float32 processing cannot hold.

    NaN/inf raise (naming the cells whose crops hold them) or are zeroed here, before alignment
    and clipping would spread them over the whole tile.
    """
    p, where = task.params, f"Tile {task.label}"
    n_values = n_cells = 0
    if image.dtype.kind == "f":
        finite = np.isfinite(image)
        if not finite.all():
            counts = window_counts((~finite).sum(axis=0), rows, cols, p.crop_size)
            hit = np.flatnonzero(counts)
            n_values, n_cells = int(counts.sum()), len(hit)
            if p.nonfinite == "raise":
                cells = [ids[i] for i in hit[:5]] if ids else hit[:5].tolist()
                msg = (
                    f"{where} holds {int(finite.size - finite.sum())} NaN or infinite pixels, "
                    f"{n_values} of them inside the crops of {n_cells} cells (e.g. {cells}); they "
                    "would spread through alignment and clipping. Fix the image, or pass "
                    "nonfinite='zero' to set them to 0 (counted in the store attributes)."
                )
                raise ValueError(msg)
            image = np.where(finite, image, image.dtype.type(0))
        if image.dtype.itemsize > 4 and np.abs(image).max() > np.finfo(np.float32).max:
            msg = (
                f"{where} holds float64 values beyond the float32 range (|x| > 3.4e38), which "
                "would become infinite. Rescale the image."
            )
            raise ValueError(msg)
    elif image.dtype.itemsize >= 4 and image.size:
        processed = p.align or p.clip_percentiles is not None or p.resize_to
        if (processed or p.dtype == "float32") and max(
            abs(int(image.min())), abs(int(image.max()))
        ) > 2**24:
            msg = (
                f"{where} holds {image.dtype} values beyond 2**24 = {2**24}, which float32 "
                "processing cannot hold exactly. Rescale the image (e.g. to uint16)."
            )
            raise ValueError(msg)
    return image, n_values, n_cells


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
    crop_size, out_size = p.crop_size, p.out_size
    n_channels, dtype = p.n_channels, np.dtype(p.dtype)
    fingerprint = source_fingerprint(task.source)
    try:
        image = _load(task)
    except UnreadableImageError as err:
        if p.on_error == "skip":
            logger.warning("Skipping tile %s: %s", task.label, err)
            empty = np.zeros((0, n_channels, out_size, out_size), dtype=dtype)
            return TileResult(
                task.index, empty, 0, 0, False, [], [], str(err), fingerprint=fingerprint
            )
        msg = f"Tile {task.label}: {err}"
        raise UnreadableImageError(msg) from err
    if image is None:
        empty = np.zeros((0, n_channels, out_size, out_size), dtype=dtype)
        return TileResult(task.index, empty, 0, 0, True, [], [], fingerprint=fingerprint)
    image = to_channel_first(
        image, channel_axis=p.channel_axis, n_channels=n_channels, where=f"Tile {task.label}"
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
    margin = p.edge_margin
    keep = (
        (rows >= margin) & (cols >= margin) & (height - rows >= margin) & (width - cols >= margin)
    )
    rows, cols = rows[keep], cols[keep]
    ids = [task.cell_ids[i] for i in np.flatnonzero(keep)] if task.cell_ids else []
    image, n_values, n_cells = _check_values(task, image, rows, cols, ids)
    if p.align:
        image, shifts = align_channels(
            image, reference_channel=p.reference_channel, upsample_factor=p.upsample_factor
        )
    else:
        shifts = np.zeros((n_channels, 2))
        if p.clip_percentiles is not None:
            image = image.astype(np.float32)  # a copy: never clip the caller's array in place
    if p.clip_percentiles is not None:
        image = clip_percentiles(image, p.clip_percentiles, copy=False)
    if p.resize_to:
        crops = resize_crops(crop_windows(image, rows, cols, crop_size), out_size)
        crops = cast_crops(crops, dtype)
    else:  # cast the tile once: cheaper than casting overlapping crops
        crops = crop_windows(cast_crops(image, dtype), rows, cols, crop_size)
    return TileResult(
        index=task.index,
        crops=crops,
        n_crops=len(crops),
        n_dropped_edge=int((~keep).sum()),
        missing=False,
        shifts=np.round(shifts, 4).tolist(),
        tile_shape=[int(height), int(width)],
        nonfinite=(n_values, n_cells),
        fingerprint=fingerprint,
    )
