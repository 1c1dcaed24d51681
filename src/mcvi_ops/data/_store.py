"""Chunked, compressed zarr v3 storage of single-cell image crops.

This module defines the format and reads it; ``_writer.py`` is its only writer. A store is a
zarr group holding one array ``crops`` of shape ``(cells, channels, height, width)``, chunked
along cells. The group's attributes say what the store is (``format``, ``format_version``), who
it is (``store_id``, a random UUID given when the store is created), whether its writer finished
(``complete``) and what it holds (``n_cells``, ``dtype``, ``intensity_range``, ``nonfinite``).
While a :class:`~mcvi_ops.data.CropWriter` is open, a lock file beside a local store
(``crops.zarr.lock``, see ``_lock.py``) keeps other processes from writing or replacing it.
"""

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

from ._lock import StoreLock

logger = logging.getLogger(__name__)

FORMAT_NAME = "mcvi-ops-crops"
FORMAT_VERSION = 2  # 2: store_id, complete, n_cells, dtype, intensity_range, nonfinite
ARRAY_NAME = "crops"
INTENSITY_PERCENTILES = (0.1, 99.9)

# In-process registry so that a `zarr.storage.MemoryStore` can be referenced by a plain string
# (the link in `adata.uns` and the `ImageField` state must stay picklable and printable).
_MEMORY_STORES: dict[str, MemoryStore] = {}
_MEMORY_PREFIX = "mcvi-memory://"

StoreLike = str | os.PathLike | Store


class IncompleteStoreError(RuntimeError):
    """The crop store's writer did not finish: it crashed, was killed or is still writing."""


def _resolve_store(store: StoreLike) -> tuple[Store | str, str]:
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


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith(("file://", _MEMORY_PREFIX, "memory://"))


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
    format_attrs
        The store group's attributes (format, ``store_id``, ``complete``, ...).

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

    def __init__(
        self, array: zarr.Array, *, url: str, format_attrs: dict[str, Any] | None = None
    ) -> None:
        if array.ndim != 4:
            msg = f"A crop array must have 4 dimensions (cells, channels, height, width), got shape {array.shape}."
            raise ValueError(msg)
        self._array = array
        self.url = url
        self.format_attrs = dict(format_attrs or {})

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

    @property
    def store_id(self) -> str | None:
        """Random UUID given when the store was created (`None` for stores older than format 2)."""
        return self.format_attrs.get("store_id")

    @property
    def complete(self) -> bool:
        """Whether the writer finished (stores older than format 2 count as complete)."""
        return bool(self.format_attrs.get("complete", True))

    @property
    def intensity_range(self) -> list[list[float]] | None:
        """Per channel ``[low, high]``: the 0.1 and 99.9 percentiles of a sample of pixels."""
        value = self.format_attrs.get("intensity_range")
        return None if value is None else [list(map(float, pair)) for pair in value]

    @property
    def nonfinite(self) -> dict[str, Any]:
        """How NaN/inf pixels were treated (``policy``, and the ``n_values``/``n_cells`` zeroed)."""
        return dict(self.format_attrs.get("nonfinite", {"policy": "raise"}))

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
        reference = {
            "url": self.url,
            "n_crops": self.n_cells,
            "n_channels": self.n_channels,
            "channel_names": self.channel_names,
            "crop_size": list(self.crop_size),
            "dtype": str(self.dtype),
        }
        if self.store_id is not None:
            reference["store_id"] = self.store_id
        return reference


def _open_group(store: StoreLike, *, mode: Literal["r", "r+", "w", "a"], storage_options=None):
    target, url = _resolve_store(store)
    kwargs: dict[str, Any] = {"mode": mode, "zarr_format": 3}
    if storage_options and isinstance(target, str):
        kwargs["storage_options"] = storage_options
    return zarr.open_group(target, **kwargs), url


def _open_existing(store: StoreLike, *, mode: Literal["r", "r+"], storage_options=None):
    """Open a crop store's group and array, with clear errors for every way that can fail."""
    _, url = _resolve_store(store)  # an unknown in-memory store gets its own message
    try:
        group, url = _open_group(store, mode=mode, storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError) as err:
        msg = (
            f"No crop store found at {url}. Check the path, or create one with "
            "`mcvi_ops.data.write_crops` or `mcvi_ops.datasets.synthetic_screen(path=...)`."
        )
        raise FileNotFoundError(msg) from err
    except Exception as err:
        if not _is_remote(url):
            raise
        msg = (
            f"Cannot reach the crop store at {url}: {type(err).__name__}: {err}. Check the "
            "address, your network connection and credentials (`storage_options=`), or copy the "
            "store to a local folder and relink with `mcvi_ops.data.link_crops`."
        )
        raise ConnectionError(msg) from err
    attrs = dict(group.attrs)
    if attrs.get("format") != FORMAT_NAME or ARRAY_NAME not in group:
        msg = (
            f"{url} is a zarr group but not an mcvi-ops crop store (attribute 'format' is "
            f"{attrs.get('format')!r}, expected {FORMAT_NAME!r}). Write crops with "
            "`mcvi_ops.data.write_crops`."
        )
        raise ValueError(msg)
    if int(attrs.get("format_version", 1)) > FORMAT_VERSION:
        msg = (
            f"{url} has crop-store format version {attrs['format_version']}, newer than this "
            f"mcvi-ops reads ({FORMAT_VERSION}). Upgrade mcvi-ops."
        )
        raise ValueError(msg)
    return group, group[ARRAY_NAME], url, attrs


def open_crops(
    store: StoreLike, *, allow_incomplete: bool = False, storage_options: dict | None = None
) -> CropStore:
    """Open a crop store written by :func:`write_crops` or :class:`CropWriter`.

    Parameters
    ----------
    store
        A local path, a URL understood by fsspec (``"s3://..."``, ``"memory://..."``), or a
        zarr store object.
    allow_incomplete
        Open a store whose writer did not finish (crashed, killed or still running), to
        inspect the crops written so far. Without it such a store raises
        :class:`~mcvi_ops.data.IncompleteStoreError`.
    storage_options
        Passed to fsspec for URLs (credentials, endpoints).

    Returns
    -------
    The opened :class:`CropStore`, read-only.

    Examples
    --------
    >>> import numpy as np
    >>> import mcvi_ops
    >>> crops = np.zeros((20, 1, 8, 8), dtype=np.uint16)
    >>> store = mcvi_ops.data.write_crops("memory://open.zarr", crops, channel_names=["DAPI"])
    >>> mcvi_ops.data.open_crops(store.url).n_cells
    20
    """
    group, array, url, attrs = _open_existing(store, mode="r", storage_options=storage_options)
    complete = attrs.get("complete", True)
    if complete and "n_cells" in attrs and int(attrs["n_cells"]) != array.shape[0]:
        complete = False
        reason = (
            f"it was finished with {attrs['n_cells']} crops but now has {array.shape[0]}, so it "
            "was changed by something other than mcvi-ops"
        )
    else:
        owner = StoreLock(url)._owner() if StoreLock(url).path is not None else {}
        reason = "its writer did not finish: it crashed, was killed" + (
            f", or is still running (process {owner.get('pid')} on {owner.get('host')!r})"
            if owner
            else " or is still running"
        )
    if not complete and not allow_incomplete:
        msg = (
            f"The crop store {url} is incomplete: {reason}. Rerun the command that writes it "
            "(`mcvi_ops.pp.extract_crops` resumes where it stopped), or pass "
            f"allow_incomplete=True to inspect the {array.shape[0]} crops it holds."
        )
        raise IncompleteStoreError(msg)
    return CropStore(array, url=url, format_attrs=attrs)
