"""Chunked, compressed zarr v3 storage of single-cell image crops.

This module is the only writer of the format. A store is a zarr group holding one array
``crops`` of shape ``(cells, channels, height, width)``, chunked along cells. The group's
attributes say what the store is (``format``, ``format_version``), who it is (``store_id``, a
random UUID given when the store is created), whether its writer finished (``complete``) and
what it holds (``n_cells``, ``dtype``, ``intensity_range``, ``nonfinite``). While a
:class:`CropWriter` is open, a lock file beside a local store (``crops.zarr.lock``) keeps other
processes from writing or replacing it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
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
FORMAT_VERSION = 2  # 2: store_id, complete, n_cells, dtype, intensity_range, nonfinite
ARRAY_NAME = "crops"
INTENSITY_PERCENTILES = (0.1, 99.9)
_ALLOWED_DTYPES = (np.dtype("uint16"), np.dtype("float32"), np.dtype("uint8"))
_TARGET_CHUNK_BYTES = 4 * 1024**2
_FLOAT32_EXACT = 2**24  # integers above this are not all representable in float32
_SAMPLE_CHUNKS = 4  # chunks read to estimate the intensity range
_SAMPLE_PIXELS = 2_000_000  # per channel

# In-process registry so that a `zarr.storage.MemoryStore` can be referenced by a plain string
# (the link in `adata.uns` and the `ImageField` state must stay picklable and printable).
_MEMORY_STORES: dict[str, MemoryStore] = {}
_MEMORY_PREFIX = "mcvi-memory://"

StoreLike = str | os.PathLike | Store
NonFinite = Literal["raise", "zero"]


class IncompleteStoreError(RuntimeError):
    """The crop store's writer did not finish: it crashed, was killed or is still writing."""


class StoreLockedError(FileExistsError):
    """Another process is writing the crop store."""


def _default_chunk_cells(n_channels: int, height: int, width: int, dtype: np.dtype) -> int:
    per_cell = n_channels * height * width * dtype.itemsize
    return int(np.clip(_TARGET_CHUNK_BYTES // max(per_cell, 1), 16, 1024))


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


# --- the writer's lock ---------------------------------------------------------------------
_HELD: dict[str, tuple[int, int]] = {}  # lock file -> (pid, how many holders in that process)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """A lock file beside a local store, created atomically, naming the writing process.

    Held locks are re-entrant within one process; a lock whose process is gone (same host,
    pid no longer running) is stale and broken. Stores that are not local paths are not locked.
    """

    def __init__(self, url: str) -> None:
        self.path = None if "://" in url else Path(url + ".lock")
        self._held = False

    def acquire(self) -> StoreLock:
        """Take the lock, or raise :class:`StoreLockedError` naming the process holding it."""
        if self.path is None or self._held:
            return self
        key, pid = str(self.path), os.getpid()
        if key in _HELD and _HELD[key][0] == pid:
            _HELD[key] = (pid, _HELD[key][1] + 1)
            self._held = True
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner: dict[str, Any] = {}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if self._stale(owner):
                    self._break(owner)
                    continue
                break
            with os.fdopen(fd, "w") as fh:
                json.dump({"pid": pid, "host": socket.gethostname(), "time": time.time()}, fh)
            _HELD[key] = (pid, 1)
            self._held = True
            return self
        msg = (
            f"The crop store {str(self.path)[: -len('.lock')]} is being written by process "
            f"{owner.get('pid', '?')} on host {owner.get('host', '?')!r} (lock file {self.path}). "
            "Wait for it to finish, or write elsewhere. If that process is gone, delete the lock "
            "file."
        )
        raise StoreLockedError(msg)

    def release(self) -> None:
        """Give the lock back (the last holder in this process deletes the file)."""
        if not self._held or self.path is None:
            return
        self._held = False
        key = str(self.path)
        pid, count = _HELD.get(key, (os.getpid(), 1))
        if count > 1:
            _HELD[key] = (pid, count - 1)
            return
        _HELD.pop(key, None)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _owner(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.path.read_text()))  # type: ignore[union-attr]
        except (OSError, ValueError, TypeError):
            return {}

    def _stale(self, owner: dict[str, Any]) -> bool:
        if not owner:  # being written right now, or its writer died within microseconds
            try:
                return time.time() - self.path.stat().st_mtime > 10  # type: ignore[union-attr]
            except FileNotFoundError:
                return True
        return owner.get("host") == socket.gethostname() and not _pid_alive(int(owner["pid"]))

    def _break(self, owner: dict[str, Any]) -> None:
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex}")  # type: ignore[union-attr]
        try:
            os.rename(self.path, aside)  # atomic: only one process breaks a given lock
        except FileNotFoundError:
            return
        logger.warning("Removed the stale lock of process %s on %s.", owner.get("pid"), self.path)
        aside.unlink(missing_ok=True)

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


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
        """How NaN/inf pixels were treated: ``policy`` and the ``n_values``/``n_cells`` zeroed."""
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
    outside the target range, integers float32 cannot hold exactly and float64 values beyond the
    float32 range raise. Returns the converted crops and the number of non-finite pixel values
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
        info = np.iinfo(dtype)
        lo, hi = float(np.min(crops)), float(np.max(crops))
        if lo < info.min or hi > info.max:
            msg = (
                f"Crop values span [{lo}, {hi}], outside the {dtype} range [{info.min}, "
                f"{info.max}]. Rescale them or write float32 crops."
            )
            raise ValueError(msg)
        if crops.dtype.kind == "f":
            crops = np.rint(crops)
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
        """A plain string naming the store (for :func:`write_chunk` in other processes)."""
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

        Buffered rows are flushed first. Other processes then call :func:`write_chunk` with
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
