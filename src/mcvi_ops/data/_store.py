"""Chunked, compressed zarr v3 storage of single-cell image crops."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore, MemoryStore

logger = logging.getLogger(__name__)

FORMAT_NAME = "mcvi-ops-crops"
FORMAT_VERSION = 1
ARRAY_NAME = "crops"
_ALLOWED_DTYPES = (np.dtype("uint16"), np.dtype("float32"), np.dtype("uint8"))
_TARGET_CHUNK_BYTES = 4 * 1024**2

# In-process registry so that a `zarr.storage.MemoryStore` can be referenced by a plain string
# (the link in `adata.uns` and the `ImageField` state must stay picklable and printable).
_MEMORY_STORES: dict[str, MemoryStore] = {}
_MEMORY_PREFIX = "mcvi-memory://"

StoreLike = str | os.PathLike | Store


def _default_chunk_cells(n_channels: int, height: int, width: int, dtype: np.dtype) -> int:
    per_cell = n_channels * height * width * dtype.itemsize
    return int(np.clip(_TARGET_CHUNK_BYTES // max(per_cell, 1), 16, 1024))


def _resolve_store(store: StoreLike, *, mode: Literal["r", "w", "a"]) -> tuple[Store | str, str]:
    """Return something `zarr.open_group` accepts, and a plain string that names it again."""
    if isinstance(store, MemoryStore):
        for key, registered in _MEMORY_STORES.items():
            if registered is store:
                return store, key
        key = f"{_MEMORY_PREFIX}{uuid.uuid4().hex}"
        _MEMORY_STORES[key] = store
        return store, key
    if isinstance(store, LocalStore):
        return store, str(Path(store.root).resolve())
    if isinstance(store, FsspecStore):
        return store, store.fs.unstrip_protocol(store.path)
    if isinstance(store, Store):
        msg = (
            f"Cannot build a persistent reference to a store of type {type(store).__name__!r}. "
            "Pass a local path, a URL (e.g. 's3://bucket/crops.zarr' or 'memory://crops.zarr'), "
            "a `zarr.storage.LocalStore`, `FsspecStore` or `MemoryStore`."
        )
        raise TypeError(msg)
    text = os.fspath(store)
    if text.startswith(_MEMORY_PREFIX):
        if text not in _MEMORY_STORES:
            msg = (
                f"The in-memory crop store {text!r} does not exist in this Python process. "
                "In-memory stores live only as long as the process that made them; write the "
                "crops to a path (e.g. `synthetic_screen(..., path='screen.zarr')`) to keep them."
            )
            raise FileNotFoundError(msg)
        return _MEMORY_STORES[text], text
    if "://" in text and not text.startswith("file://"):
        return text, text
    local = Path(text.removeprefix("file://")).expanduser().resolve()
    return str(local), str(local)


class CropStore:
    """Single-cell image crops in a chunked, compressed zarr v3 array.

    Crops have shape ``(n_cells, n_channels, height, width)`` and are chunked along cells, so a
    chunk holds all channels and the full crop of ``chunk_cells`` consecutive cells. Create one
    with :func:`write_crops` or :class:`CropWriter` and open one with :func:`open_crops`.

    Parameters
    ----------
    array
        The zarr array holding the crops.
    url
        A plain string that reopens the same store with :func:`open_crops`.

    Examples
    --------
    >>> import numpy as np
    >>> import mcvi_ops
    >>> crops = np.random.default_rng(0).integers(0, 4000, (100, 4, 64, 64), dtype=np.uint16)
    >>> store = mcvi_ops.data.write_crops(
    ...     "memory://example.zarr", crops, channel_names=["DAPI", "tubulin", "gH2AX", "phalloidin"]
    ... )
    >>> store[[5, 2, 5]].shape
    (3, 4, 64, 64)
    """

    def __init__(self, array: zarr.Array, *, url: str) -> None:
        if array.ndim != 4:
            msg = f"A crop array must have 4 dimensions (cells, channels, height, width), got shape {array.shape}."
            raise ValueError(msg)
        self._array = array
        self.url = url

    # --- description ----------------------------------------------------------------------
    @property
    def array(self) -> zarr.Array:
        """The underlying zarr array."""
        return self._array

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(n_cells, n_channels, height, width)``."""
        return tuple(int(s) for s in self._array.shape)  # type: ignore[return-value]

    @property
    def n_cells(self) -> int:
        """Number of crops."""
        return self.shape[0]

    @property
    def n_channels(self) -> int:
        """Number of image channels."""
        return self.shape[1]

    @property
    def crop_size(self) -> tuple[int, int]:
        """``(height, width)`` of every crop in pixels."""
        return self.shape[2], self.shape[3]

    @property
    def dtype(self) -> np.dtype:
        """Pixel data type."""
        return np.dtype(self._array.dtype)

    @property
    def chunk_cells(self) -> int:
        """Number of cells per chunk."""
        return int(self._array.chunks[0])

    @property
    def n_chunks(self) -> int:
        """Number of chunks along the cell axis."""
        return -(-self.n_cells // self.chunk_cells)

    @property
    def attrs(self) -> dict[str, Any]:
        """Attributes stored with the crops (channel names, pixel size, ...)."""
        return dict(self._array.attrs)

    @property
    def channel_names(self) -> list[str]:
        """Names of the channels, in order."""
        return list(self._array.attrs.get("channel_names", []))

    @property
    def pixel_size(self) -> float | None:
        """Pixel size in micrometres, if recorded."""
        value = self._array.attrs.get("pixel_size")
        return None if value is None else float(value)

    def __len__(self) -> int:
        return self.n_cells

    def __repr__(self) -> str:
        return (
            f"CropStore({self.url!r}, n_cells={self.n_cells}, channels={self.channel_names}, "
            f"crop_size={self.crop_size}, dtype={self.dtype}, chunk_cells={self.chunk_cells})"
        )

    # --- reading --------------------------------------------------------------------------
    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        """First and one-past-last cell of chunk ``chunk``."""
        start = chunk * self.chunk_cells
        return start, min(start + self.chunk_cells, self.n_cells)

    def read_chunk(self, chunk: int) -> np.ndarray:
        """Read every crop of one chunk."""
        if not 0 <= chunk < self.n_chunks:
            msg = f"Chunk {chunk} is out of range: the store has {self.n_chunks} chunks."
            raise IndexError(msg)
        start, stop = self.chunk_bounds(chunk)
        return self._array[start:stop]

    def iter_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_cell, crops)`` for every chunk in order."""
        for chunk in range(self.n_chunks):
            yield self.chunk_bounds(chunk)[0], self.read_chunk(chunk)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):
            rows, rest = key[0], key[1:]
            return self[rows][(slice(None), *rest)]
        if isinstance(key, slice | int | np.integer):
            return self._array[key]
        return self.take(key)

    def take(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Read the crops at arbitrary row indices.

        The result equals ``numpy_array[indices]``: same order, repeats allowed, negative indices
        counted from the end, and boolean masks accepted. Each chunk the indices touch is read and
        decoded once.

        Parameters
        ----------
        indices
            Integer row indices or a boolean mask of length ``n_cells``.

        Returns
        -------
        Array of shape ``(len(indices), n_channels, height, width)``.
        """
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (self.n_cells,):
                msg = f"A boolean mask must have shape ({self.n_cells},), got {idx.shape}."
                raise IndexError(msg)
            idx = np.flatnonzero(idx)
        if idx.size == 0:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        if not np.issubdtype(idx.dtype, np.integer):
            msg = f"Crop indices must be integers or a boolean mask, got dtype {idx.dtype}."
            raise IndexError(msg)
        idx = idx.reshape(-1).astype(np.int64, copy=False)
        idx = np.where(idx < 0, idx + self.n_cells, idx)
        bad = (idx < 0) | (idx >= self.n_cells)
        if bad.any():
            msg = (
                f"Crop index {int(np.asarray(indices).reshape(-1)[np.argmax(bad)])} is out of range "
                f"for a store of {self.n_cells} crops."
            )
            raise IndexError(msg)
        unique, inverse = np.unique(idx, return_inverse=True)
        out = np.empty((unique.size, *self.shape[1:]), dtype=self.dtype)
        chunk_of = unique // self.chunk_cells
        # one read per touched chunk, spanning only the rows needed inside it
        boundaries = np.flatnonzero(np.diff(chunk_of)) + 1
        for lo, hi in zip(np.r_[0, boundaries], np.r_[boundaries, unique.size], strict=True):
            first, last = int(unique[lo]), int(unique[hi - 1])
            block = self._array[first : last + 1]
            out[lo:hi] = block[unique[lo:hi] - first]
        return out[inverse]

    def to_numpy(self) -> np.ndarray:
        """Read every crop into memory."""
        return self._array[:]

    def reference(self) -> dict[str, Any]:
        """A plain-data description that :func:`open_crops` accepts back (via its ``url``)."""
        return {
            "url": self.url,
            "n_crops": self.n_cells,
            "n_channels": self.n_channels,
            "channel_names": self.channel_names,
            "crop_size": list(self.crop_size),
            "dtype": str(self.dtype),
        }


def _open_group(store: StoreLike, *, mode: Literal["r", "w", "a"], storage_options=None):
    target, url = _resolve_store(store, mode=mode)
    kwargs: dict[str, Any] = {"mode": mode, "zarr_format": 3}
    if storage_options and isinstance(target, str):
        kwargs["storage_options"] = storage_options
    return zarr.open_group(target, **kwargs), url


def open_crops(store: StoreLike, *, storage_options: dict | None = None) -> CropStore:
    """Open a crop store written by :func:`write_crops` or :class:`CropWriter`.

    Parameters
    ----------
    store
        A local path, a URL understood by fsspec (``"s3://..."``, ``"memory://..."``), or a
        zarr store object.
    storage_options
        Passed to fsspec for URLs (credentials, endpoints).

    Returns
    -------
    The opened :class:`CropStore`, read-only.
    """
    _resolve_store(store, mode="r")  # an unknown in-memory store gets its own message
    try:
        group, url = _open_group(store, mode="r", storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError) as err:
        msg = (
            f"No crop store found at {store!s}. Check the path, or create one with "
            "`mcvi_ops.data.write_crops` or `mcvi_ops.datasets.synthetic_screen(path=...)`."
        )
        raise FileNotFoundError(msg) from err
    if group.attrs.get("format") != FORMAT_NAME or ARRAY_NAME not in group:
        msg = (
            f"{store!s} is a zarr group but not an mcvi-ops crop store (attribute 'format' is "
            f"{group.attrs.get('format')!r}, expected {FORMAT_NAME!r}). Write crops with "
            "`mcvi_ops.data.write_crops`."
        )
        raise ValueError(msg)
    return CropStore(group[ARRAY_NAME], url=url)


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
    names = [str(n) for n in channel_names]
    if len(names) != n_channels:
        msg = (
            f"Got {len(names)} channel names {names} for crops with {n_channels} channels; give "
            "exactly one name per channel, in channel order."
        )
        raise ValueError(msg)
    if len(set(names)) != len(names):
        msg = f"Channel names must be unique, got {names}."
        raise ValueError(msg)
    if min(crop_size) < 1:
        msg = f"Crop height and width must be positive, got {crop_size}."
        raise ValueError(msg)
    return dtype, names


class CropWriter:
    """Write crops to a new store batch by batch, so stores larger than memory can be made.

    Rows are buffered until a chunk is full, so every chunk is compressed and written once.
    Use it as a context manager, or call :meth:`close` to flush the last partial chunk.

    Parameters
    ----------
    store
        Where to write: a local path, a URL, or a zarr store object. Must not already hold data
        unless ``overwrite=True``.
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
        mode: Literal["w", "a"] = "w" if overwrite else "a"
        group, url = _open_group(store, mode=mode, storage_options=storage_options)
        if not overwrite and (ARRAY_NAME in group or len(dict(group.attrs))):
            msg = (
                f"{store!s} already holds a crop store; pass `overwrite=True` to replace it or "
                "choose a new path."
            )
            raise FileExistsError(msg)
        group.attrs.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION})
        array_attrs = {"channel_names": names, "pixel_size": pixel_size, **(attrs or {})}
        self._array = group.create_array(
            ARRAY_NAME,
            shape=(0, n_channels, *crop_size),
            chunks=(int(chunk_cells), n_channels, *crop_size),
            dtype=dtype,
            compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
            fill_value=0,
            attributes=array_attrs,
            dimension_names=("cell", "channel", "y", "x"),
        )
        self._url = url
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._written = 0
        self._closed = False

    @property
    def n_written(self) -> int:
        """Number of rows appended so far (flushed or buffered)."""
        return self._written + self._buffered

    @property
    def store(self) -> CropStore:
        """The store being written (complete after :meth:`~mcvi_ops.data.CropWriter.close`)."""
        return CropStore(self._array, url=self._url)

    def append(self, crops: np.ndarray) -> None:
        """Append a batch of crops of shape ``(n, n_channels, height, width)``."""
        if self._closed:
            msg = "This CropWriter is closed; open a new one to write more crops."
            raise RuntimeError(msg)
        crops = np.asarray(crops)
        expected = tuple(self._array.shape[1:])
        if crops.ndim != 4 or tuple(crops.shape[1:]) != expected:
            msg = (
                f"Expected crops of shape (n, {', '.join(map(str, expected))}), got {crops.shape}. "
                "Crops must be channel-first (cells, channels, height, width)."
            )
            raise ValueError(msg)
        if crops.dtype != self._array.dtype:
            crops = _cast(crops, np.dtype(self._array.dtype))
        self._buffer.append(crops)
        self._buffered += len(crops)
        chunk = int(self._array.chunks[0])
        if self._buffered >= chunk:
            data = np.concatenate(self._buffer)
            n_full = (len(data) // chunk) * chunk
            self._write(data[:n_full])
            rest = data[n_full:]
            self._buffer = [rest] if len(rest) else []
            self._buffered = len(rest)

    def _write(self, data: np.ndarray) -> None:
        if not len(data):
            return
        start = self._written
        self._array.resize((start + len(data), *self._array.shape[1:]))
        self._array[start : start + len(data)] = data
        self._written += len(data)

    def close(self) -> CropStore:
        """Flush buffered rows and return the finished store."""
        if not self._closed:
            if self._buffer:
                self._write(np.concatenate(self._buffer))
            self._buffer, self._buffered = [], 0
            self._closed = True
            logger.info("Wrote %d crops to %s", self._written, self._url)
        return self.store

    def __enter__(self) -> CropWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cast(crops: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        lo, hi = float(np.min(crops)), float(np.max(crops))
        if lo < info.min or hi > info.max:
            msg = (
                f"Crop values span [{lo}, {hi}], outside the {dtype} range [{info.min}, {info.max}]. "
                "Rescale them or write float32 crops."
            )
            raise ValueError(msg)
        if np.issubdtype(crops.dtype, np.floating):
            crops = np.rint(crops)
    return crops.astype(dtype)


def write_crops(
    store: StoreLike,
    crops: np.ndarray,
    *,
    channel_names: Sequence[str],
    chunk_cells: int | None = None,
    pixel_size: float | None = None,
    attrs: dict[str, Any] | None = None,
    overwrite: bool = False,
    storage_options: dict | None = None,
) -> CropStore:
    """Write an in-memory array of crops to a new chunked zarr store.

    Parameters
    ----------
    store
        A local path, a URL understood by fsspec (``"memory://..."``, ``"s3://..."``) or a zarr store.
    crops
        Array of shape ``(n_cells, n_channels, height, width)``, uint16, uint8 or float32.
    channel_names
        One name per channel.
    chunk_cells
        Cells per chunk; by default about 4 MB of uncompressed pixels per chunk.
    pixel_size
        Pixel size in micrometres.
    attrs
        Extra attributes stored with the crops.
    overwrite
        Replace an existing store.
    storage_options
        Passed to fsspec for URLs.

    Returns
    -------
    The written :class:`CropStore`.
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
        overwrite=overwrite,
        storage_options=storage_options,
    ) as writer:
        step = max(int(writer._array.chunks[0]) * 16, 1)
        for start in range(0, len(crops), step):
            writer.append(crops[start : start + step])
    return writer.store
