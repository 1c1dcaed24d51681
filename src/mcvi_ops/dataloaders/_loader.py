"""The crop dataset and data loader of AnnData rows registered with scvi-tools."""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
import zarr
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager, AnnTorchDataset
from torch.utils.data import DataLoader, Dataset, get_worker_info

from mcvi_ops._constants import CROP_INDEX_KEY
from mcvi_ops.data._link import UNS_KEY, crop_reference
from mcvi_ops.data._store import _MEMORY_PREFIX, CropStore, open_crops

from ._sampler import BalancedChunkSampler
from ._slots import SlotBatch, SlotPool

logger = logging.getLogger(__name__)

X_KEY = REGISTRY_KEYS.X_KEY
_TORCH_DTYPES = {
    np.dtype("uint8"): torch.uint8,
    np.dtype("uint16"): torch.uint16,
    np.dtype("float32"): torch.float32,
}


CodecPipeline = Literal["zarr", "zarrs"]
_CODEC_PIPELINES = {
    "zarr": {"codec_pipeline.path": "zarr.core.codec_pipeline.BatchedCodecPipeline"},
    "zarrs": {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"},
}


def _check_codec_pipeline(name: str) -> str:
    if name not in _CODEC_PIPELINES:
        msg = f"`codec_pipeline` must be 'zarr' or 'zarrs', got {name!r}."
        raise ValueError(msg)
    if name == "zarrs" and importlib.util.find_spec("zarrs") is None:
        msg = (
            "`codec_pipeline='zarrs'` needs the zarrs package, which is not installed: "
            "`pip install zarrs`, or use `codec_pipeline='zarr'`."
        )
        raise ImportError(msg)
    return name


def _image_uns_key(adata_manager: AnnDataManager, image_key: str) -> str:
    for field in adata_manager.fields:
        if getattr(field, "registry_key", None) == image_key:
            return getattr(field, "uns_key", UNS_KEY)
    registered = list(adata_manager.data_registry.keys())
    msg = (
        f"No image field registered under {image_key!r} (registered keys: {registered}). Register "
        f"`ImageField({image_key!r})` in `setup_anndata`, or pass the right `image_key=`."
    )
    raise KeyError(msg)


def _field_dtype(adata_manager: AnnDataManager, key: str) -> type:
    """int64 for integer codes (categories), float32 for everything else."""
    sample = np.asarray(adata_manager.get_from_registry(key)[:1])
    return (
        np.int64 if np.issubdtype(sample.dtype, np.integer) or sample.dtype == bool else np.float32
    )


def _is_in_memory(url: str) -> bool:
    return url.startswith((_MEMORY_PREFIX, "memory://"))


def _fork_for_memory_store(url: str, num_workers: int, dataloader_kwargs: dict[str, Any]) -> int:
    """Workers only see an in-memory store through the parent's memory, so they must be forked."""
    context = dataloader_kwargs.get("multiprocessing_context")
    name = getattr(context, "get_start_method", lambda: context)() if context else None
    if name not in (None, "fork"):
        msg = (
            f"The crop store {url!r} lives in this process's memory, which {name!r} data-loader "
            "workers cannot see. Write the crops to a path, use `num_workers=0`, or "
            "`multiprocessing_context='fork'`."
        )
        raise ValueError(msg)
    if "fork" not in multiprocessing.get_all_start_methods():
        logger.warning(
            "The crop store %r is in memory and this platform cannot fork worker processes; "
            "loading in the main process (num_workers=0). Write the crops to a path to use workers.",
            url,
        )
        dataloader_kwargs.pop("multiprocessing_context", None)
        return 0
    dataloader_kwargs["multiprocessing_context"] = "fork"
    return num_workers


class CropDataset(Dataset):
    """Batches of crops and registered fields for rows of an AnnData registered with scvi-tools.

    Indexing with a list of row positions returns a whole batch (the loader passes the batches of
    a :class:`BalancedChunkSampler`), so the crops of a batch are read with one
    :meth:`~mcvi_ops.data.CropStore.take` call that decodes each touched chunk once.

    Parameters
    ----------
    adata_manager
        Manager of an AnnData set up with an :class:`~mcvi_ops.data.ImageField`.
    image_key
        Registry key of the image field.
    cache_chunks
        Number of decoded store chunks kept in memory (least recently used are dropped), per
        process. Chunk-aware samplers revisit the chunks of a window over several batches, so a
        cache of ``4 * window_chunks`` chunks (both streams, two windows each) decodes each chunk
        about once per window instead of once per batch. ``0`` reads every batch with
        :meth:`~mcvi_ops.data.CropStore.take` (each touched chunk decoded once per batch). With the default
        ~4 MB chunks, 32 chunks take ~128 MB.
    codec_pipeline
        ``"zarr"``: zarr-python's own decoding. ``"zarrs"``: the Rust codec pipeline of the
        `zarrs <https://github.com/zarrs/zarrs-python>`_ package (``pip install zarrs``), which
        decoded the default blosc-zstd chunks with 4-14% less CPU time per cell in
        ``benchmarks/results/loader.md``. The crops read are the same either way.

    Notes
    -----
    A batch is a dict of tensors with ``B`` rows:

    ``"X"``
        ``(B, n_channels, height, width)`` raw pixel values (not normalised) in the store's dtype
        (``torch.uint16`` for uint16 stores, ``torch.uint8``, ``torch.float32``): half the bytes
        of float32 to hand from worker processes and to copy to a GPU. The modules convert them
        with ``.float()`` on the device (:meth:`~mcvi_ops.module.BaseImageVAE.correct_intensity`,
        :class:`~mcvi_ops.module.CropTransform`); call ``batch["X"].float()`` to use them
        yourself (``torch.uint16`` tensors support conversion, comparison and arithmetic with
        float tensors, but few other operations).
    ``"crop_index"``
        int64 ``(B, 1)``, the crop index of each row.
    every other registry key (``"perturbation"``, ``"batch"``, ...)
        int64 ``(B, k)`` for integer data (categorical codes), float32 ``(B, k)`` otherwise.

    The store is opened lazily in each process, so the dataset can be sent to (forked or spawned)
    data-loader workers.
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        *,
        image_key: str = "crops",
        cache_chunks: int = 32,
        codec_pipeline: CodecPipeline = "zarr",
    ) -> None:
        if isinstance(cache_chunks, bool) or int(cache_chunks) != cache_chunks or cache_chunks < 0:
            msg = f"`cache_chunks` must be a non-negative integer, got {cache_chunks!r}."
            raise ValueError(msg)
        self.cache_chunks = int(cache_chunks)
        self.codec_pipeline = _check_codec_pipeline(codec_pipeline)
        uns_key = _image_uns_key(adata_manager, image_key)
        reference = crop_reference(adata_manager.adata, uns_key=uns_key)
        self.url = str(reference["url"])
        options = reference.get("storage_options")
        self.storage_options = dict(options) if options else None
        self.image_key = image_key
        self.crop_indices = (
            np.asarray(adata_manager.get_from_registry(image_key)).reshape(-1).astype(np.int64)
        )
        # scvi-tools' dataset reads and casts the registered fields (integer codes as int64);
        # they are read once and kept as arrays, so workers receive arrays and not the AnnData
        keys = [key for key in adata_manager.data_registry if key not in (image_key, X_KEY)]
        dtypes = {key: _field_dtype(adata_manager, key) for key in keys}
        table = AnnTorchDataset(adata_manager, getitem_tensors=dtypes)[np.arange(len(self))]
        self.fields: dict[str, np.ndarray] = {
            key: values.reshape(len(values), -1) for key, values in table.items()
        }
        self._store: CropStore | None = None
        self._pid: int | None = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        #: shared-memory slots of the loader's workers (set by CropDataLoader)
        self._pool: SlotPool | None = None

    @property
    def store(self) -> CropStore:
        """The crop store, opened once per process."""
        if self._store is None or self._pid != os.getpid():
            # the pipeline is chosen when the array is opened and kept by it
            with zarr.config.set(_CODEC_PIPELINES[self.codec_pipeline]):
                self._store = open_crops(self.url, storage_options=self.storage_options)
            self._pid = os.getpid()
            self._cache = OrderedDict()
        return self._store

    @property
    def chunk_cells(self) -> int:
        """Cells per chunk of the crop store."""
        return self.store.chunk_cells

    def __len__(self) -> int:
        return len(self.crop_indices)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store"] = None
        state["_pid"] = None
        state["_cache"] = OrderedDict()
        return state

    def _chunk(self, chunk: int) -> np.ndarray:
        data = self._cache.get(chunk)
        if data is None:
            data = self.store.read_chunk(chunk)
            self._cache[chunk] = data
            if len(self._cache) > self.cache_chunks:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(chunk)
        return data

    def _read_into(self, out: np.ndarray, crop_indices: np.ndarray) -> None:
        """Write the crops of ``crop_indices`` into ``out``, each cached chunk decoded once."""
        store = self.store
        chunk_cells = store.chunk_cells
        chunks = crop_indices // chunk_cells
        by_chunk = np.argsort(chunks, kind="stable")
        starts = np.flatnonzero(np.diff(chunks[by_chunk], prepend=-1))
        for lo, hi in zip(starts, [*starts[1:], len(by_chunk)], strict=True):
            rows = by_chunk[lo:hi]
            chunk = int(chunks[rows[0]])
            out[rows] = self._chunk(chunk)[crop_indices[rows] - chunk * chunk_cells]

    def _read(self, crop_indices: np.ndarray) -> np.ndarray:
        store = self.store
        if self.cache_chunks == 0:
            # `take` reads the sorted unique indices chunk by chunk, restoring the batch order
            return store.take(crop_indices)
        out = np.empty((len(crop_indices), *store.shape[1:]), dtype=store.dtype)
        self._read_into(out, crop_indices)
        return out

    def _fields(self, rows: np.ndarray, crop_indices: np.ndarray) -> dict[str, np.ndarray]:
        fields = {CROP_INDEX_KEY: crop_indices.reshape(-1, 1)}
        fields.update({key: values[rows] for key, values in self.fields.items()})
        return fields

    def __getitem__(self, rows: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor] | SlotBatch:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        crop_indices = self.crop_indices[rows]
        info = get_worker_info()
        pool = self._pool
        slot = None
        if (
            info is not None
            and pool is not None
            and info.id < pool.n_workers
            and len(rows) <= pool.batch_capacity
        ):
            slot = pool.acquire(info.id)
        if slot is not None:
            # a data-loader worker of CropDataLoader: write into a shared slot, send its number
            out = pool.data[info.id, slot, : len(rows)].numpy()
            if self.cache_chunks == 0:
                out[:] = self.store.take(crop_indices)
            else:
                self._read_into(out, crop_indices)
            return SlotBatch(
                pool, info.id, slot, len(rows), X_KEY, self._fields(rows, crop_indices)
            )
        # the store's dtype, not float32: the module converts on the device
        batch = {X_KEY: torch.from_numpy(self._read(crop_indices))}
        batch.update(
            {key: torch.from_numpy(v) for key, v in self._fields(rows, crop_indices).items()}
        )
        return batch


def _keep(batch: Any) -> Any:
    """Collate in a worker: the batch as the dataset gave it (a :class:`SlotBatch`)."""
    return batch


class CropDataLoader(DataLoader):
    """Data loader of image crops and registered fields, balanced and chunk-aware.

    Parameters
    ----------
    adata_manager
        Manager of an AnnData set up with an :class:`~mcvi_ops.data.ImageField` (and, for
        ``balanced=True``, a perturbation field whose control category has code ``control_code``).
    indices
        Row positions to load; all rows if `None`.
    batch_size
        Cells per batch (even when ``balanced=True``).
    shuffle
        Shuffle chunk-locally, differently each epoch (see :meth:`BalancedChunkSampler.set_epoch`).
        If `False`, rows come in the order of ``indices``.
    balanced
        Give every batch equally many control and perturbed cells (see
        :class:`BalancedChunkSampler`).
    window_chunks
        Number of store chunks whose cells are shuffled together.
    drop_last
        Drop the last, smaller batch of each epoch.
    seed
        Seed of the shuffles; ``scvi.settings.seed`` by default.
    num_workers
        Worker processes reading crops. Each worker reads its own contiguous run of the epoch's
        batches (see :class:`BalancedChunkSampler`), so its chunk cache is not shared, and
        writes them into shared-memory slots reused batch after batch. Workers of an in-memory
        store are forked (they only see the store through the parent's memory).
    image_key
        Registry key of the image field.
    perturbation_key
        Registry key of the perturbation field (used when ``balanced=True``).
    control_code
        Code of the control category in the perturbation field.
    num_replicas
        Distributed processes sharing the epoch; see :class:`BalancedChunkSampler`.
    rank
        Rank of this process; see :class:`BalancedChunkSampler`.
    cache_chunks
        Decoded chunks cached per process (see :class:`CropDataset`); ``4 * window_chunks`` by
        default, ``0`` to read each batch with :meth:`~mcvi_ops.data.CropStore.take` only.
    codec_pipeline
        ``"zarr"`` or ``"zarrs"`` (faster decoding, ``pip install zarrs``); see
        :class:`CropDataset`.
    **dataloader_kwargs
        Passed to :class:`torch.utils.data.DataLoader`. ``pin_memory`` defaults to whether a
        CUDA GPU is available, ``persistent_workers`` to `True` when ``num_workers > 0`` (workers
        keep their open store and chunk cache between epochs); ``prefetch_factor`` (2) batches
        per worker are read ahead.

    Notes
    -----
    Each batch is a dict described in :class:`CropDataset`; its crops keep the store's dtype
    (``torch.uint16``), and the model converts them to float on its device. The sampler is the
    loader's ``sampler`` (batches are fetched whole, ``batch_size=None`` for torch), so Lightning
    calls its ``set_epoch``. Under DDP train with ``use_distributed_sampler=False`` so that
    Lightning keeps it.

    Settings for a GPU node (e.g. 16 cores, one GPU; ``benchmarks/results/loader.md``): a worker
    reads about 9,000 balanced cells/s of 4 x 64 x 64 uint16 crops per core when a quarter of
    the cells are controls, and about 3,000 when 5% are (the control half of each batch is read
    from many chunks), while a GPU trains far faster than one core reads, so give most cores to
    workers: ``num_workers=12`` (the cores minus the main process, the pin-memory thread and some
    room), ``window_chunks=8`` to ``16`` (more mixing, more cache), ``cache_chunks`` left at
    ``4 * window_chunks`` per worker (~4 MB per chunk), ``pin_memory=True`` (the default with a
    GPU), ``persistent_workers=True`` (the default with workers), ``prefetch_factor=4`` and
    ``codec_pipeline="zarrs"``. With ``model.train()``: ``num_workers=12,
    datasplitter_kwargs={"prefetch_factor": 4, "codec_pipeline": "zarrs"}``. Under DDP these are
    per rank: divide the cores among the ranks.

    Examples
    --------
    >>> loader = CropDataLoader(
    ...     manager, batch_size=128, shuffle=True, balanced=True
    ... )  # doctest: +SKIP
    >>> batch = next(iter(loader))  # doctest: +SKIP
    >>> batch["X"].shape, batch["perturbation"].shape  # doctest: +SKIP
    (torch.Size([128, 4, 64, 64]), torch.Size([128, 1]))
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        indices: Sequence[int] | np.ndarray | None = None,
        *,
        batch_size: int = 256,
        shuffle: bool = False,
        balanced: bool = False,
        window_chunks: int = 8,
        drop_last: bool = False,
        seed: int | None = None,
        num_workers: int = 0,
        image_key: str = "crops",
        perturbation_key: str = "perturbation",
        control_code: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        cache_chunks: int | None = None,
        codec_pipeline: CodecPipeline = "zarr",
        **dataloader_kwargs,
    ) -> None:
        cache = 4 * int(window_chunks) if cache_chunks is None else cache_chunks
        dataset = CropDataset(
            adata_manager, image_key=image_key, cache_chunks=cache, codec_pipeline=codec_pipeline
        )
        n_obs = len(dataset)
        if indices is None:
            rows = np.arange(n_obs, dtype=np.int64)
        else:
            rows = np.asarray(indices)
            if rows.dtype == bool:
                rows = np.flatnonzero(rows)
            rows = rows.astype(np.int64, copy=False).reshape(-1)
            if len(rows) and (rows.min() < 0 or rows.max() >= n_obs):
                msg = f"`indices` must be row positions in [0, {n_obs - 1}], got {rows.min()}..{rows.max()}."
                raise IndexError(msg)
        is_control = None
        if balanced:
            if perturbation_key not in dataset.fields:
                msg = (
                    f"`balanced=True` needs the perturbation field {perturbation_key!r}, but the "
                    f"registered keys are {list(adata_manager.data_registry.keys())}. Register it "
                    "or use `balanced=False`."
                )
                raise KeyError(msg)
            is_control = dataset.fields[perturbation_key][rows, 0] == control_code
        if num_workers > 0 and _is_in_memory(dataset.url):
            num_workers = _fork_for_memory_store(dataset.url, num_workers, dataloader_kwargs)
        if num_workers > 0:
            # workers keep their open store and chunk cache from one epoch to the next
            dataloader_kwargs.setdefault("persistent_workers", True)
        if dataloader_kwargs.get("pin_memory") is None:
            dataloader_kwargs["pin_memory"] = torch.cuda.is_available()
        chunk_cells = dataset.chunk_cells
        sampler = BalancedChunkSampler(
            rows,
            dataset.crop_indices[rows] // chunk_cells,
            is_control=is_control,
            batch_size=batch_size,
            balanced=balanced,
            shuffle=shuffle,
            window_chunks=window_chunks,
            drop_last=drop_last,
            seed=seed,
            num_replicas=num_replicas,
            rank=rank,
            num_workers=num_workers,
        )
        self.indices = rows
        if num_workers > 0:
            dataloader_kwargs.setdefault("collate_fn", _keep)
        super().__init__(
            dataset,
            sampler=sampler,
            batch_size=None,
            num_workers=num_workers,
            **dataloader_kwargs,
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.num_workers > 0 and self.collate_fn is _keep and self.dataset._pool is None:
            # before the workers start, so that forked workers share it
            store = self.dataset.store
            self.dataset._pool = SlotPool(
                self.num_workers,
                (self.prefetch_factor or 2) + 2,
                (self.sampler.batch_size, *store.shape[1:]),
                _TORCH_DTYPES[store.dtype],
            )
        for batch in super().__iter__():
            yield batch.to_tensors() if isinstance(batch, SlotBatch) else batch

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the sampler (for custom training loops)."""
        self.sampler.set_epoch(epoch)
