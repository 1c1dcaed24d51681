"""Writing crop stores: batch by batch in one process, or chunk by chunk from workers.

:class:`CropWriter` creates (or resumes) a store, holds its lock and marks it complete when
closed; :func:`write_crops` writes an in-memory array in one call; :func:`prepare_crops` and
:func:`write_chunk` let worker processes convert and write whole chunks of rows a writer reserved.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import zarr

from ._lock import StoreLock
from ._store import (
    ARRAY_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    INTENSITY_PERCENTILES,
    CropStore,
    StoreLike,
    _open_existing,
    _open_group,
    _resolve_store,
)

logger = logging.getLogger(__name__)

_ALLOWED_DTYPES = (np.dtype("uint16"), np.dtype("float32"), np.dtype("uint8"))
_TARGET_CHUNK_BYTES = 4 * 1024**2
_FLOAT32_EXACT = 2**24  # integers above this are not all representable in float32
_SAMPLE_CHUNKS = 4  # chunks read to estimate the intensity range
_SAMPLE_PIXELS = 2_000_000  # per channel

NonFinite = Literal["raise", "zero"]


def _default_chunk_cells(n_channels: int, height: int, width: int, dtype: np.dtype) -> int:
    per_cell = n_channels * height * width * dtype.itemsize
    return int(np.clip(_TARGET_CHUNK_BYTES // max(per_cell, 1), 16, 1024))


def _validate_layout(
    n_channels: int, crop_size: tuple[int, int], dtype: Any, channel_names: Sequence[str]
) -> tuple[np.dtype, list[str]]:
    dtype = np.dtype(dtype)
    if dtype not in _ALLOWED_DTYPES:
        msg = (
            f"Crops must be uint8, uint16 or float32, got {dtype}. Convert them first, e.g. "
            "`crops.astype(np.float32)`."
        )
        raise TypeError(msg)
    names = check_channel_names(channel_names)
    if len(names) != n_channels:
        msg = (
            f"Got {len(names)} channel names {names} for crops with {n_channels} channels; give "
            "exactly one name per channel, in channel order."
        )
        raise ValueError(msg)
    if min(crop_size) < 1:
        msg = f"Crop height and width must be positive, got {crop_size}."
        raise ValueError(msg)
    return dtype, names


def check_channel_names(channel_names: Any) -> list[str]:
    """Channel names as a list of unique strings; a lone string is an error, not a list."""
    if isinstance(channel_names, str | bytes):
        msg = (
            f"channel_names must be a list with one name per channel, got the string "
            f"{channel_names!r}. Pass e.g. ['DAPI', 'tubulin'] (or [{channel_names!r}] for one "
            "channel)."
        )
        raise ValueError(msg)
    names = [str(n) for n in channel_names]
    if len(set(names)) != len(names):
        msg = f"Channel names must be unique, got {names}."
        raise ValueError(msg)
    return names


def check_integer_range(crops: np.ndarray, dtype: np.dtype, *, fix: str) -> None:
    """Fail when the (non-NaN) values of ``crops`` do not fit the integer type ``dtype``.

    ``fix`` completes the message "Rescale them or ...", naming how to ask for float32 crops.
    """
    info = np.iinfo(dtype)
    lo, hi = float(np.nanmin(crops)), float(np.nanmax(crops))
    if lo < info.min or hi > info.max:
        msg = (
            f"Crop values span [{lo}, {hi}], outside the {dtype} range [{info.min}, "
            f"{info.max}]. Rescale them or {fix}."
        )
        raise ValueError(msg)


def _name_cells(rows: np.ndarray, cell_names: Sequence[Any] | None, first_row: int) -> str:
    shown = [
        repr(str(cell_names[r])) if cell_names is not None else f"row {first_row + r}"
        for r in rows[:5]
    ]
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    return ", ".join(shown) + more


def prepare_crops(
    crops: np.ndarray,
    dtype: np.dtype,
    *,
    nonfinite: NonFinite = "raise",
    cell_names: Sequence[Any] | None = None,
    first_row: int = 0,
) -> tuple[np.ndarray, int, int]:
    """Convert crops to the store's dtype without silent loss.

    NaN/inf pixels raise (naming the cells) or, with ``nonfinite="zero"``, become 0; integers
    outside the target range, fractional values for an integer store, integers float32 cannot
    hold exactly and float64 values beyond the float32 range raise. Returns the converted crops and the number of non-finite pixel values
    and of cells that held them.
    """
    crops = np.asarray(crops)
    n_values = n_cells = 0
    where = lambda rows: _name_cells(rows, cell_names, first_row)  # noqa: E731
    if crops.dtype.kind == "f" and len(crops):
        finite = np.isfinite(crops)
        if not finite.all():
            bad = ~finite.reshape(len(crops), -1).all(axis=1)
            rows = np.flatnonzero(bad)
            n_values, n_cells = int(finite.size - np.count_nonzero(finite)), len(rows)
            if nonfinite == "raise":
                msg = (
                    f"{n_cells} crops hold NaN or infinite pixel values ({n_values} values): "
                    f"cells {where(rows)}. Fix the images, drop these cells, or pass "
                    "nonfinite='zero' to set such pixels to 0 (the count is recorded in the store)."
                )
                raise ValueError(msg)
            if nonfinite != "zero":
                msg = f"nonfinite must be 'raise' or 'zero', got {nonfinite!r}."
                raise ValueError(msg)
            crops = np.where(finite, crops, crops.dtype.type(0))
    if (
        dtype == np.float32
        and crops.dtype.kind in "iu"
        and len(crops)
        and max(abs(int(crops.min())), abs(int(crops.max()))) > _FLOAT32_EXACT
    ):
        flat = crops.reshape(len(crops), -1)
        big = (flat.max(axis=1).astype(np.float64) > _FLOAT32_EXACT) | (
            flat.min(axis=1).astype(np.float64) < -_FLOAT32_EXACT
        )
        if big.any():
            msg = (
                f"{crops.dtype} crops hold values above 2**24 = {_FLOAT32_EXACT} (cells "
                f"{where(np.flatnonzero(big))}), which float32 cannot store exactly. Rescale them "
                "(e.g. divide by a constant) or, if they fit, cast to uint16 first."
            )
            raise ValueError(msg)
    if dtype == np.float32 and crops.dtype.itemsize > 4 and crops.dtype.kind == "f" and len(crops):
        big = np.abs(crops.reshape(len(crops), -1)).max(axis=1) > np.finfo(np.float32).max
        if big.any():
            msg = (
                f"float64 crops hold values beyond the float32 range (|x| > 3.4e38; cells "
                f"{where(np.flatnonzero(big))}), which would become infinite. Rescale them."
            )
            raise ValueError(msg)
    if np.issubdtype(dtype, np.integer) and crops.dtype != dtype and len(crops):
        check_integer_range(crops, dtype, fix="write float32 crops (dtype='float32')")
        if crops.dtype.kind == "f":
            fractional = (crops != np.rint(crops)).reshape(len(crops), -1).any(axis=1)
            if fractional.any():
                msg = (
                    f"{crops.dtype} crops hold fractional values (cells "
                    f"{where(np.flatnonzero(fractional))}), which the {dtype} store would round. "
                    "Write float32 crops (dtype='float32'), or scale and round them yourself."
                )
                raise ValueError(msg)
    return crops.astype(dtype, copy=False), n_values, n_cells


class CropWriter:
    """Write crops to a new store batch by batch, so stores larger than memory can be made.

    Rows are buffered until a chunk is full, so every chunk is compressed and written once.
    Use it as a context manager, or call :meth:`close` to flush the last partial chunk. The
    store is marked complete only by :meth:`close`: a writer left by an exception, or a killed
    process, leaves a store that :func:`open_crops` refuses to open. While the writer is open a
    lock file beside a local store keeps other processes from writing or replacing it.

    Parameters
    ----------
    store
        Where to write: a local path, a URL, or a zarr store object. Must not already hold data
        unless ``overwrite=True`` or ``resume_at`` is given.
    n_channels
        Number of channels of every crop.
    crop_size
        ``(height, width)`` of every crop.
    channel_names
        One name per channel.
    dtype
        ``uint16``, ``uint8`` or ``float32``.
    chunk_cells
        Cells per chunk; by default about 4 MB of uncompressed pixels, between 16 and 1024 cells.
    pixel_size
        Pixel size in micrometres, stored as an attribute.
    attrs
        Extra attributes stored with the crops.
    overwrite
        Replace an existing store at ``store``.
    resume_at
        Continue an existing store after its first ``resume_at`` crops (later rows are dropped).
        The store's layout must match the arguments. A complete store reopened this way gets a
        new ``store_id``, since its content may change.
    nonfinite
        What to do with NaN/inf pixels: ``"raise"`` (naming the cells) or ``"zero"`` (set them
        to 0 and count them in the store attribute ``nonfinite``).
    storage_options
        Passed to fsspec for URLs.

    Examples
    --------
    >>> import numpy as np
    >>> from mcvi_ops.data import CropWriter
    >>> with CropWriter(
    ...     "memory://stream.zarr",
    ...     n_channels=2,
    ...     crop_size=(32, 32),
    ...     channel_names=["DAPI", "tubulin"],
    ...     chunk_cells=16,
    ... ) as writer:
    ...     for _ in range(3):
    ...         writer.append(np.zeros((10, 2, 32, 32), dtype=np.uint16))
    >>> writer.store.n_cells
    30
    """

    def __init__(
        self,
        store: StoreLike,
        *,
        n_channels: int,
        crop_size: int | tuple[int, int],
        channel_names: Sequence[str],
        dtype: Any = np.uint16,
        chunk_cells: int | None = None,
        pixel_size: float | None = None,
        attrs: dict[str, Any] | None = None,
        overwrite: bool = False,
        resume_at: int | None = None,
        nonfinite: NonFinite = "raise",
        storage_options: dict | None = None,
    ) -> None:
        if isinstance(crop_size, int | np.integer):
            crop_size = (int(crop_size), int(crop_size))
        crop_size = (int(crop_size[0]), int(crop_size[1]))
        dtype, names = _validate_layout(n_channels, crop_size, dtype, channel_names)
        if chunk_cells is None:
            chunk_cells = _default_chunk_cells(n_channels, *crop_size, dtype)
        if int(chunk_cells) < 1:
            msg = f"`chunk_cells` must be a positive integer, got {chunk_cells}."
            raise ValueError(msg)
        if nonfinite not in ("raise", "zero"):
            msg = f"nonfinite must be 'raise' or 'zero', got {nonfinite!r}."
            raise ValueError(msg)
        if resume_at is not None and overwrite:
            msg = "Pass either overwrite=True (start again) or resume_at= (continue), not both."
            raise ValueError(msg)
        _, url = _resolve_store(store)
        self._lock = StoreLock(url).acquire()
        self._url, self._nonfinite = url, nonfinite
        self._buffer: list[np.ndarray] = []
        self._buffered = self._written = self._reserved = 0
        self._counts = [0, 0]  # non-finite values, cells
        self._closed = False
        layout = (n_channels, crop_size, dtype, int(chunk_cells), names)
        try:
            if resume_at is None:
                self._create(store, layout, pixel_size, attrs, overwrite, storage_options)
            else:
                self._resume(store, layout, int(resume_at), storage_options)
        except BaseException:
            self._lock.release()
            raise

    def _create(self, store, layout, pixel_size, attrs, overwrite, storage_options) -> None:
        n_channels, crop_size, dtype, chunk_cells, names = layout
        group, _ = _open_group(
            store, mode="w" if overwrite else "a", storage_options=storage_options
        )
        if not overwrite and (ARRAY_NAME in group or len(dict(group.attrs))):
            state = "an incomplete" if group.attrs.get("complete") is False else "a"
            msg = (
                f"{self._url} already holds {state} crop store; pass `overwrite=True` to replace "
                "it or choose a new path."
            )
            raise FileExistsError(msg)
        group.attrs.update(
            {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "store_id": str(uuid.uuid4()),
                "complete": False,
                "dtype": str(dtype),
                "nonfinite": {"policy": self._nonfinite, "n_values": 0, "n_cells": 0},
            }
        )
        self._array = group.create_array(
            ARRAY_NAME,
            shape=(0, n_channels, *crop_size),
            chunks=(chunk_cells, n_channels, *crop_size),
            dtype=dtype,
            compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
            fill_value=0,
            attributes={"channel_names": names, "pixel_size": pixel_size, **(attrs or {})},
            dimension_names=("cell", "channel", "y", "x"),
        )
        self._group = group

    def _resume(self, store, layout, resume_at: int, storage_options) -> None:
        group, array, _, attrs = _open_existing(store, mode="r+", storage_options=storage_options)
        n_channels, crop_size, dtype, chunk_cells, names = layout
        found = (array.shape[1], tuple(array.shape[2:]), np.dtype(array.dtype), array.chunks[0])
        found_names = list(array.attrs.get("channel_names", []))
        if "store_id" not in attrs or found != layout[:4] or found_names != names:
            msg = (
                f"Cannot resume the crop store {self._url}: it holds (channels, crop size, dtype, "
                f"chunk cells, names) = {(*found, found_names)} (format version "
                f"{attrs.get('format_version', 1)}) but this run writes {layout}. Start again "
                "with overwrite=True."
            )
            raise ValueError(msg)
        if not 0 <= resume_at <= array.shape[0]:
            msg = (
                f"Cannot resume the crop store {self._url} at crop {resume_at}: it holds only "
                f"{array.shape[0]} crops. Start again with overwrite=True."
            )
            raise ValueError(msg)
        update: dict[str, Any] = {"complete": False}
        if attrs.get("complete", True):  # its content is about to change
            update["store_id"] = str(uuid.uuid4())
        group.attrs.update(update)
        # keep every resumed row on disk; the partial last chunk stays buffered so it is rewritten
        # whole once later rows fill it
        start = (resume_at // chunk_cells) * chunk_cells
        tail = array[start:resume_at]
        if array.shape[0] != resume_at:
            array.resize((start, *array.shape[1:]))  # drops every chunk after the kept rows
            array.resize((resume_at, *array.shape[1:]))
            if len(tail):
                array[start:resume_at] = tail
        self._group, self._array, self._nonfinite = group, array, attrs["nonfinite"]["policy"]
        self._written = start
        self._buffer, self._buffered = ([tail], len(tail)) if len(tail) else ([], 0)

    @property
    def n_written(self) -> int:
        """Number of rows appended so far (flushed or buffered)."""
        return self._written + self._buffered

    @property
    def chunk_cells(self) -> int:
        """Cells per chunk."""
        return int(self._array.chunks[0])

    @property
    def url(self) -> str:
        """A plain string naming the store (for ``write_chunk`` in other processes)."""
        return self._url

    @property
    def store(self) -> CropStore:
        """The store being written (complete after :meth:`~mcvi_ops.data.CropWriter.close`)."""
        return CropStore(self._array, url=self._url, format_attrs=dict(self._group.attrs))

    def _check_open(self) -> None:
        if self._closed:
            msg = "This CropWriter is closed; open a new one to write more crops."
            raise RuntimeError(msg)

    def append(self, crops: np.ndarray, *, cell_names: Sequence[Any] | None = None) -> None:
        """Append a batch of crops of shape ``(n, n_channels, height, width)``.

        ``cell_names`` (one per crop) name the cells in errors about their values.
        """
        self._check_open()
        if self._reserved:
            msg = "This CropWriter reserved rows for write_chunk; close it with close(n_cells=)."
            raise RuntimeError(msg)
        crops = np.asarray(crops)
        expected = tuple(self._array.shape[1:])
        if crops.ndim != 4 or tuple(crops.shape[1:]) != expected:
            msg = (
                f"Expected crops of shape (n, {', '.join(map(str, expected))}), got {crops.shape}. "
                "Crops must be channel-first (cells, channels, height, width)."
            )
            raise ValueError(msg)
        crops, n_values, n_cells = prepare_crops(
            crops,
            np.dtype(self._array.dtype),
            nonfinite=self._nonfinite,
            cell_names=cell_names,
            first_row=self.n_written,
        )
        self.add_nonfinite_counts(n_values, n_cells)
        self._buffer.append(crops)
        self._buffered += len(crops)
        chunk = self.chunk_cells
        if self._buffered >= chunk:
            data = np.concatenate(self._buffer)
            n_full = (len(data) // chunk) * chunk
            self._write(self._written, data[:n_full])
            self._written += n_full
            rest = data[n_full:]
            self._buffer = [rest] if len(rest) else []
            self._buffered = len(rest)

    def add_nonfinite_counts(self, n_values: int, n_cells: int) -> None:
        """Count non-finite pixels zeroed outside :meth:`append` (by other processes)."""
        self._counts[0] += int(n_values)
        self._counts[1] += int(n_cells)

    def _write(self, start: int, data: np.ndarray) -> None:
        if not len(data):
            return
        stop = start + len(data)
        if self._array.shape[0] < stop:
            self._array.resize((stop, *self._array.shape[1:]))
        self._array[start:stop] = data

    def flush(self) -> None:
        """Write buffered rows now, so every appended row is on disk (e.g. before a checkpoint).

        The partial chunk stays buffered and is rewritten whole once later rows fill it.
        """
        self._check_open()
        if self._buffer:
            data = np.concatenate(self._buffer)
            self._buffer = [data]
            self._write(self._written, data)

    def reserve(self, n_cells: int) -> None:
        """Let other processes write whole chunks of the first ``n_cells`` rows.

        Buffered rows are flushed first. Other processes then call ``write_chunk`` with
        :attr:`url`, and this writer is finished with ``close(n_cells=...)``, the number of rows
        actually written; :meth:`append` is no longer allowed.
        """
        self._check_open()
        self.flush()
        self._reserved = max(int(n_cells), self.n_written)
        self._array.resize((self._reserved, *self._array.shape[1:]))

    def close(self, *, n_cells: int | None = None) -> CropStore:
        """Flush buffered rows, mark the store complete and return it.

        ``n_cells`` is required after :meth:`reserve`: the number of rows written in all.
        """
        if self._closed:
            return self.store
        if self._reserved:
            if n_cells is None or not self.n_written <= n_cells <= self._reserved:
                msg = (
                    f"close(n_cells=) must give the rows written after reserve(), between "
                    f"{self.n_written} and {self._reserved}; got {n_cells}."
                )
                raise ValueError(msg)
            self._array.resize((int(n_cells), *self._array.shape[1:]))
        elif self._buffer:
            self._write(self._written, np.concatenate(self._buffer))
        self._written = int(self._array.shape[0])
        self._buffer, self._buffered = [], 0
        nonfinite = {"policy": self._nonfinite, "n_values": self._counts[0]}
        nonfinite["n_cells"] = self._counts[1]
        self._group.attrs.update(
            {
                "intensity_range": _intensity_range(self._array),
                "intensity_percentiles": list(INTENSITY_PERCENTILES),
                "nonfinite": nonfinite,
                "n_cells": self._written,
                "complete": True,
            }
        )
        self._closed = True
        self._lock.release()
        logger.info("Wrote %d crops to %s", self._written, self._url)
        return self.store

    def abort(self) -> None:
        """Stop writing without marking the store complete, and release the lock."""
        self._closed = True
        self._buffer, self._buffered = [], 0
        self._lock.release()

    def __enter__(self) -> CropWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _intensity_range(array: zarr.Array) -> list[list[float]] | None:
    """Per channel 0.1/99.9 percentiles of a deterministic sample: a few evenly spaced chunks."""
    n, chunk = int(array.shape[0]), int(array.chunks[0])
    if n == 0:
        return None
    n_chunks = -(-n // chunk)
    picks = np.unique(np.linspace(0, n_chunks - 1, min(_SAMPLE_CHUNKS, n_chunks)).round())
    sample = np.concatenate([array[int(k) * chunk : min((int(k) + 1) * chunk, n)] for k in picks])
    flat = sample.transpose(1, 0, 2, 3).reshape(sample.shape[1], -1)
    flat = flat[:, :: max(1, flat.shape[1] // _SAMPLE_PIXELS)]
    low, high = np.percentile(flat, INTENSITY_PERCENTILES, axis=1)
    return [[float(lo), float(hi)] for lo, hi in zip(low, high, strict=True)]


def write_chunk(
    store: StoreLike, start: int, crops: np.ndarray, *, storage_options: dict | None = None
) -> None:
    """Write whole chunks of a store that a :class:`CropWriter` has reserved rows of.

    For worker processes: ``start`` must be a chunk boundary and ``crops`` (already in the
    store's dtype, see :func:`prepare_crops`) must end on a chunk boundary or at the end of the
    reserved rows' last chunk. Each chunk must be written by one process only.
    """
    group, array, url, attrs = _open_existing(store, mode="r+", storage_options=storage_options)
    chunk, stop = int(array.chunks[0]), start + len(crops)
    if attrs.get("complete", True) or start % chunk or stop > array.shape[0]:
        msg = (
            f"write_chunk({url!r}, start={start}, {len(crops)} crops): rows must start on a chunk "
            f"boundary ({chunk} cells) inside the {array.shape[0]} rows reserved by an open "
            "CropWriter."
        )
        raise ValueError(msg)
    if crops.dtype != array.dtype or tuple(crops.shape[1:]) != tuple(array.shape[1:]):
        msg = (
            f"write_chunk got crops {crops.shape} {crops.dtype}; the store holds "
            f"{tuple(array.shape[1:])} {array.dtype}. Convert them with prepare_crops first."
        )
        raise ValueError(msg)
    if crops.dtype.kind == "f" and not np.isfinite(crops).all():
        msg = "write_chunk got NaN/inf pixels; handle them with prepare_crops first."
        raise ValueError(msg)
    array[start:stop] = crops


def write_crops(
    store: StoreLike,
    crops: np.ndarray,
    *,
    channel_names: Sequence[str],
    chunk_cells: int | None = None,
    pixel_size: float | None = None,
    attrs: dict[str, Any] | None = None,
    nonfinite: NonFinite = "raise",
    overwrite: bool = False,
    storage_options: dict | None = None,
) -> CropStore:
    """Write an in-memory array of crops to a new chunked zarr store.

    Parameters
    ----------
    store
        A local path, a URL understood by fsspec (``"memory://..."``, ``"s3://..."``) or a zarr store.
    crops
        Array of shape ``(n_cells, n_channels, height, width)``. uint8, uint16 and float32 are
        kept; other types are stored as float32 when that is exact (integers up to 2**24,
        floats within the float32 range), otherwise an error says how to convert them.
    channel_names
        One name per channel.
    chunk_cells
        Cells per chunk; by default about 4 MB of uncompressed pixels per chunk.
    pixel_size
        Pixel size in micrometres.
    attrs
        Extra attributes stored with the crops.
    nonfinite
        NaN/inf pixels: ``"raise"`` (an error naming the cells) or ``"zero"`` (set to 0 and
        counted in the store attribute ``nonfinite``).
    overwrite
        Replace an existing store.
    storage_options
        Passed to fsspec for URLs.

    Returns
    -------
    The written :class:`CropStore`.

    Examples
    --------
    >>> import numpy as np
    >>> import mcvi_ops
    >>> crops = np.ones((10, 2, 16, 16), dtype=np.uint16)
    >>> store = mcvi_ops.data.write_crops("memory://w.zarr", crops, channel_names=["DAPI", "actin"])
    >>> store.intensity_range
    [[1.0, 1.0], [1.0, 1.0]]
    """
    crops = np.asarray(crops)
    if crops.ndim != 4:
        msg = (
            f"Crops must have 4 dimensions (cells, channels, height, width), got shape {crops.shape}. "
            "Add a channel axis with `crops[:, None]` for single-channel crops."
        )
        raise ValueError(msg)
    dtype = crops.dtype if crops.dtype in _ALLOWED_DTYPES else np.dtype("float32")
    with CropWriter(
        store,
        n_channels=crops.shape[1],
        crop_size=crops.shape[2:],
        channel_names=channel_names,
        dtype=dtype,
        chunk_cells=chunk_cells,
        pixel_size=pixel_size,
        attrs=attrs,
        nonfinite=nonfinite,
        overwrite=overwrite,
        storage_options=storage_options,
    ) as writer:
        step = max(writer.chunk_cells * 16, 1)
        for start in range(0, len(crops), step):
            writer.append(crops[start : start + step])
    return writer.store
