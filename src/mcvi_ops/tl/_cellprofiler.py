"""CellProfiler measurements of every linked crop, computed with cp-measure in parallel."""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import os
import re
import sys
import warnings
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Literal, get_args

import numpy as np
import pandas as pd
from anndata import AnnData

from mcvi_ops._constants import UNS
from mcvi_ops.data import CropStore, linked_store, open_crops
from mcvi_ops.data._link import crop_reference

from ._cp_objects import check_label_channel, objects

logger = logging.getLogger(__name__)

Family = Literal[
    "intensity", "sizeshape", "texture", "granularity", "radial_distribution", "colocalization"
]
FAMILIES: tuple[str, ...] = get_args(Family)
#: granularity is left out: on 64 px crops it costs more than all other families together
#: (see ``benchmarks/results/cellprofiler.md``)
DEFAULT_FAMILIES: tuple[str, ...] = tuple(f for f in FAMILIES if f != "granularity")
OBJECTS = ("Nuclei", "Cells")
UNS_KEY = "cellprofiler_features"

_CATEGORY = {
    "intensity": "Intensity",
    "sizeshape": "AreaShape",
    "texture": "Texture",
    "granularity": "Granularity",
    "radial_distribution": "RadialDistribution",
    "colocalization": "Correlation",
}
# positions say where the cell sat in its crop (or in the mosaic it was measured in), not what it
# looks like; normalised moments of order < 2 are undefined (always NaN)
_DROPPED = re.compile(
    r"^(Location_.*|Center_[XY]|BoundingBox(Minimum|Maximum)_[XY]|NormalizedMoment_(0_0|0_1|1_0))$"
)
_TRAILING_PARAMS = re.compile(r"^(?P<head>.*?)(?P<params>(?:_\d+(?:of\d+)?)*)$")
_PAD = 2  # background pixels between crops in a measurement mosaic, so objects never touch
_COSTES_SCALE = 255
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_STORES: dict[str, CropStore] = {}  # per-process cache of opened stores (workers reuse them)


@dataclass(frozen=True)
class _Config:
    """Everything a worker needs; plain data so that it pickles to worker processes."""

    url: str
    storage_options: dict | None
    channels: tuple[int, ...]  # store channel of each measured channel
    channel_names: tuple[str, ...]
    scale: tuple[float, ...]  # one per measured channel: the value measured as 1.0
    nucleus_channel: int  # position in `channels`
    cell_channels: tuple[int, ...]  # positions in `channels`
    nuclei_mask: tuple[str, int] | None  # ("image" | "labels", store channel)
    cells_mask: tuple[str, int] | None
    label_url: str | None
    families: tuple[str, ...]
    chunk_cells: int
    costes: bool = False
    columns: tuple[str, ...] = ()


def cellprofiler_features(
    adata: AnnData,
    *,
    families: Sequence[Family] | Family = DEFAULT_FAMILIES,
    channels: Sequence[str] | None = None,
    masks: Literal["segment"] | str | Mapping[str, str] = "segment",
    nucleus_channel: str | None = None,
    label_store: CropStore | str | os.PathLike | None = None,
    intensity_scale: Literal["store", "dtype"] | float | Sequence[float] = "store",
    costes: bool = False,
    n_jobs: int = -1,
    batch_cells: int = 64,
    progress: bool = True,
    uns_key: str = UNS.crops,
) -> AnnData:
    """CellProfiler measurements of every cell's crop, as a cells x features AnnData.

    .. long function: documentation and signature; the body is under 80 lines.

    Each crop is segmented into the central cell's nucleus and whole-cell object (or the objects
    are read from label images), then measured with `cp-measure <https://github.com/afermg/cp_measure>`_,
    CellProfiler's measurement modules as a library: intensity, size and shape, texture,
    granularity and radial distribution of every channel on both objects, and colocalisation of
    every channel pair. Crops are read from the linked crop store chunk by chunk in worker
    processes that each open the store themselves; only features come back, so memory does not
    grow with the number of cells beyond the result table.

    Segmentation (``masks="segment"``) follows CellProfiler's IdentifyPrimaryObjects and
    IdentifySecondaryObjects ("Distance - B"): nuclei are the Otsu-thresholded, Gaussian-smoothed
    nuclear channel, holes filled and touching nuclei split at the peaks of their distance
    transform; the crop's nucleus is the one at, or nearest to, the crop centre. Cells are the
    Li-thresholded log of the other channels' sum, each foreground pixel going to its nearest
    nucleus, so neighbours are cut off; the crop bounds the cell. A crop without a nucleus gets
    NaN features, and a warning gives the count.

    Features follow CellProfiler's names, ``{Object}_{Category}_{Measurement}_{Channel}[_{params}]``
    (e.g. ``Nuclei_Intensity_MeanIntensity_DAPI``, ``Cells_Texture_Contrast_DAPI_3_00_256``,
    ``Cells_Correlation_Correlation_DAPI_tubulin``), with cp-measure's default settings
    (CellProfiler's). Positions inside the crop (``Location_*``, ``Center_*``, bounding boxes)
    are left out. Results do not depend on ``n_jobs``. A cell's features depend on its crop
    alone, not on the cells measured with it (``batch_cells``, the rows asked for), except that
    CellProfiler's enclosing-circle search, which sets the Zernike moments' disc, handles the
    objects of a call together and can round a few cells' circles differently.

    Parameters
    ----------
    adata
        Cells linked to a crop store (see :func:`~mcvi_ops.data.link_crops`).
    families
        Measurement families (one name or a tuple): ``"intensity"``, ``"sizeshape"`` (area,
        shape, Zernike, Feret), ``"texture"`` (Haralick, scale 3, 256 grey levels),
        ``"granularity"`` (16-step spectrum), ``"radial_distribution"`` (4 rings and radial
        Zernikes), ``"colocalization"`` (Pearson correlation and slope, Manders, rank-weighted
        colocalisation; see ``costes``). The default is all but granularity, which costs as
        much as all the others together on 64 px crops (``benchmarks/results/cellprofiler.md``).
    channels
        Channels to measure; by default every channel that is not a mask.
    masks
        ``"segment"`` segments nuclei and cells. A channel name takes nuclei from that label
        channel (the label at or nearest the crop centre) and segments the cell around it. A
        mapping ``{"nuclei": name, "cells": name}`` takes both (the cell is the label overlapping
        the nucleus most). Names refer to channels of ``label_store`` if given, else of the crop
        store; label channels are not measured.
    nucleus_channel
        Channel segmented for nuclei; by default the first measured channel (DNA stain first).
    label_store
        A crop store (or its path) of label images aligned with the crop store, row for row.
    intensity_scale
        The pixel value measured as 1.0, per channel. ``"store"``: each channel's 99.9th
        percentile over a fixed sample of up to 4 chunks of the store (the same for any subset of
        cells), so texture's 256 grey levels and Costes' grid span the signal. ``"dtype"``: the
        dtype's maximum (CellProfiler's convention; 1.0 for float crops). A number or one number
        per measured channel sets it. Texture and Costes clip values above 1.
    costes
        Add Costes' automatically thresholded Manders coefficients to ``"colocalization"``
        (CellProfiler's default). Their threshold search costs more than all default families
        together, so they are off unless asked for.
    n_jobs
        Worker processes; ``-1`` uses every core available to this process, ``-2`` all but one.
    batch_cells
        Crops measured together (as one mosaic of separated crops; larger is faster per cell up to
        about 64) and the unit of work of a worker.
    progress
        Show a progress bar.
    uns_key
        Key of the crop store reference in ``adata.uns``.

    Returns
    -------
    Cells x features AnnData with ``adata``'s obs_names and a copy of its ``.obs``, float32
    ``.X`` (NaN where an object is missing or a measurement undefined), and

    ``.var``
        Indexed by feature name, with columns ``object`` (``"Nuclei"``/``"Cells"``), ``channel``
        (``""`` for shape, ``"a:b"`` for a channel pair), ``family`` and ``measurement``.
    ``.uns["cellprofiler_features"]``
        ``{"params", "intensity_scale", "n_missing"}``: the settings, the scale used per channel
        and the number of cells without a nucleus / cell object.
    ``.uns[uns_key]``
        The crop store reference, so :func:`~mcvi_ops.data.get_crops` works on the result.

    Examples
    --------
    >>> import mcvi_ops
    >>> adata = mcvi_ops.datasets.synthetic_screen(
    ...     n_cells=2000, path="screen.zarr"
    ... )  # doctest: +SKIP
    >>> features = mcvi_ops.tl.cellprofiler_features(
    ...     adata, families=("intensity", "sizeshape")
    ... )  # doctest: +SKIP
    >>> features.var.query("family == 'intensity' and channel == 'DAPI'").head()  # doctest: +SKIP
    """
    reference = crop_reference(adata, uns_key=uns_key)
    store = linked_store(adata, uns_key=uns_key)
    labels = _open_label_store(label_store, store)
    config = _configure(
        store,
        labels,
        families,
        channels,
        masks,
        nucleus_channel,
        intensity_scale,
        reference.get("storage_options"),
    )
    if batch_cells < 1:
        msg = f"batch_cells must be a positive number of crops, got {batch_cells}."
        raise ValueError(msg)
    config = replace(config, costes=bool(costes))
    columns, var = _columns(config)
    config = replace(config, columns=tuple(columns))

    crop_index = adata.obs[reference["index_key"]].to_numpy().astype(np.int64)
    unique, inverse = np.unique(crop_index, return_inverse=True)
    tasks = _tasks(unique, store.chunk_cells, batch_cells)
    n_workers = min(_n_workers(n_jobs), max(len(tasks), 1))
    if n_workers > 1 and not _reopenable(config):
        logger.info("The crop store lives in this process's memory; measuring in one process.")
        n_workers = 1
    values = np.full((unique.size, len(columns)), np.nan, dtype=np.float32)
    missing = np.zeros(3, dtype=np.int64)  # no nucleus, no cell, values beyond float32
    from tqdm.auto import tqdm

    with tqdm(
        total=int(unique.size), unit="cell", desc="CellProfiler features", disable=not progress
    ) as bar:
        for start, block, n_missing in _results(tasks, config, n_workers, (store, labels)):
            values[start : start + block.shape[0]] = block
            missing += n_missing
            bar.update(block.shape[0])

    if missing[2]:
        logger.warning(
            "%d feature values exceed the float32 range (|x| > 3.4e38) and are stored as "
            "infinite; check those cells' crops or leave the features out before normalising.",
            missing[2],
        )
    for name, count in zip(OBJECTS, missing[:2], strict=True):
        if count:
            logger.warning(
                "%d of %d crops have no %s (empty mask); their %s_* features are NaN.",
                count,
                unique.size,
                {"Nuclei": "nucleus", "Cells": "cell"}[name],
                name,
            )
    if not (inverse.size == unique.size and (inverse == np.arange(inverse.size)).all()):
        values = values[inverse]  # rows in another order than the store, or repeated
    out = AnnData(X=values, obs=adata.obs.copy(), var=var)
    out.uns[uns_key] = dict(adata.uns[uns_key])
    out.uns[UNS_KEY] = {
        "params": {
            "families": list(config.families),
            "channels": list(config.channel_names),
            "masks": masks if isinstance(masks, str) else dict(masks),
            "nucleus_channel": config.channel_names[config.nucleus_channel],
            "label_store": config.label_url or "",
            "costes": config.costes,
        },
        "intensity_scale": np.asarray(config.scale, dtype=np.float64),
        "n_missing": {"nuclei": int(missing[0]), "cells": int(missing[1])},
    }
    return out


# --- options ---------------------------------------------------------------------------------
def _open_label_store(label_store, store: CropStore) -> CropStore | None:
    if label_store is None:
        return None
    labels = label_store if isinstance(label_store, CropStore) else open_crops(label_store)
    if labels.n_cells != store.n_cells or labels.crop_size != store.crop_size:
        msg = (
            f"label_store holds {labels.n_cells} crops of {labels.crop_size} px but the crop store "
            f"holds {store.n_cells} of {store.crop_size} px; label images must match the crops "
            "row for row. Write them with the same crop indices and size."
        )
        raise ValueError(msg)
    return labels


def _configure(
    store, labels, families, channels, masks, nucleus_channel, intensity_scale, store_options
):
    families = (families,) if isinstance(families, str) else tuple(families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        msg = f"Unknown measurement families {unknown}; choose from {list(FAMILIES)}."
        raise ValueError(msg)
    families = tuple(f for f in FAMILIES if f in families)
    names = store.channel_names
    mask_source = labels.channel_names if labels is not None else names

    def mask_channel(name: str, role: str) -> tuple[str, int]:
        if name not in mask_source:
            where = "label_store" if labels is not None else "the crop store"
            msg = f"Mask channel {name!r} ({role}) is not a channel of {where}: {mask_source}."
            raise KeyError(msg)
        source = labels if labels is not None else store
        check_label_channel(source, mask_source.index(name), name, role)
        return ("labels" if labels is not None else "image", mask_source.index(name))

    if isinstance(masks, Mapping):
        extra = set(masks) - {"nuclei", "cells"}
        if extra or "nuclei" not in masks:
            msg = f"`masks` as a mapping needs the key 'nuclei' (and optionally 'cells'); got {list(masks)}."
            raise ValueError(msg)
        nuclei_mask = mask_channel(masks["nuclei"], "nuclei")
        cells_mask = mask_channel(masks["cells"], "cells") if "cells" in masks else None
    elif masks == "segment":
        nuclei_mask = cells_mask = None
    else:
        nuclei_mask, cells_mask = mask_channel(str(masks), "nuclei"), None
    in_image = {m[1] for m in (nuclei_mask, cells_mask) if m is not None and m[0] == "image"}
    measurable = [n for i, n in enumerate(names) if i not in in_image]
    if channels is None:
        channels = measurable
    channels = [str(c) for c in channels]
    bad = [c for c in channels if c not in measurable]
    if bad or not channels:
        msg = f"Cannot measure channels {bad or channels}; measurable channels are {measurable}."
        raise ValueError(msg)
    nucleus = channels[0] if nucleus_channel is None else str(nucleus_channel)
    if nucleus not in channels:
        msg = f"nucleus_channel {nucleus!r} is not among the measured channels {channels}."
        raise ValueError(msg)
    if "colocalization" in families and len(channels) < 2:
        logger.warning("Colocalisation needs at least 2 channels; skipping it.")
        families = tuple(f for f in families if f != "colocalization")
    index = tuple(names.index(c) for c in channels)
    nucleus_pos = channels.index(nucleus)
    return _Config(
        url=store.url,
        storage_options=store_options,
        channels=index,
        channel_names=tuple(channels),
        scale=_scale(store, index, intensity_scale),
        nucleus_channel=nucleus_pos,
        cell_channels=tuple(i for i in range(len(channels)) if i != nucleus_pos),
        nuclei_mask=nuclei_mask,
        cells_mask=cells_mask,
        label_url=None if labels is None else labels.url,
        families=families,
        chunk_cells=store.chunk_cells,
    )


def _scale(store: CropStore, channels: tuple[int, ...], how) -> tuple[float, ...]:
    if isinstance(how, str):
        if how == "dtype":
            kind = store.dtype
            top = float(np.iinfo(kind).max) if np.issubdtype(kind, np.integer) else 1.0
            return tuple(top for _ in channels)
        if how != "store":
            msg = f"intensity_scale must be 'store', 'dtype' or numbers, got {how!r}."
            raise ValueError(msg)
        picks = np.unique(np.linspace(0, store.n_chunks - 1, min(4, store.n_chunks)).astype(int))
        sample = np.concatenate([store.read_chunk(int(c))[:, list(channels)] for c in picks])
        top = np.percentile(sample.astype(np.float32), 99.9, axis=(0, 2, 3))
        fallback = sample.reshape(sample.shape[0], len(channels), -1).max(axis=(0, 2))
        top = np.where(top > 0, top, np.where(fallback > 0, fallback, 1.0))
        return tuple(float(t) for t in top)
    values = np.asarray(how, dtype=np.float64)
    values = np.full(len(channels), values) if values.ndim == 0 else values
    if values.shape != (len(channels),) or not (np.isfinite(values) & (values > 0)).all():
        msg = (
            f"intensity_scale must be one positive number or one per measured channel "
            f"({len(channels)}), got {how!r}."
        )
        raise ValueError(msg)
    return tuple(float(v) for v in values)


def _columns(config: _Config) -> tuple[list[str], pd.DataFrame]:
    """Feature names and their var table, from measuring one artificial cell."""
    size = 33
    yy, xx = np.mgrid[:size, :size] - size // 2
    radius2 = yy**2 + xx**2
    nuclei, cells = (radius2 <= 36)[None], (radius2 <= 144)[None]
    pixels = np.random.default_rng(0).uniform(0.1, 0.9, (1, len(config.channels), size, size))
    meta: dict[str, tuple[str, str, str, str]] = {}
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        _measure(pixels, nuclei, cells, np.zeros(1, dtype=np.int64), config, meta=meta)
    var = pd.DataFrame.from_dict(
        meta, orient="index", columns=["object", "channel", "family", "measurement"]
    )
    return list(meta), var.astype(str)


# --- parallel execution ----------------------------------------------------------------------
def _n_workers(n_jobs: int) -> int:
    if n_jobs == 0:
        msg = "n_jobs must be a positive number of processes, or -1 for all cores; got 0."
        raise ValueError(msg)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) + 1 + n_jobs) if n_jobs < 0 else int(n_jobs)


def _reopenable(config: _Config) -> bool:
    """Whether worker processes can open the stores (in-memory ones need a forked worker)."""
    in_memory = any(
        url is not None and url.startswith(("mcvi-memory://", "memory://"))
        for url in (config.url, config.label_url)
    )
    return sys.platform.startswith("linux") or not in_memory


def _tasks(unique: np.ndarray, chunk_cells: int, batch_cells: int) -> list[tuple[int, np.ndarray]]:
    """``(position in unique, crop indices)`` batches that never straddle a store chunk."""
    chunk = unique // chunk_cells
    starts = np.r_[0, np.flatnonzero(np.diff(chunk)) + 1, unique.size]
    tasks = []
    for lo, hi in itertools.pairwise(starts.tolist()):
        for start in range(lo, hi, batch_cells):
            tasks.append((start, unique[start : min(start + batch_cells, hi)]))
    return tasks


def _results(tasks, config: _Config, n_workers: int, stores) -> Iterator[tuple]:
    """Yield ``(start, values, n_missing)`` per task, at most ``2 * n_workers`` in flight."""
    if n_workers <= 1:
        for start, indices in tasks:
            yield (start, *_process(indices, config, stores))
        return
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    executor = ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context(method))
    pending: deque[tuple[int, Future]] = deque()
    queue = iter(tasks)
    try:
        for start, indices in itertools.islice(queue, 2 * n_workers):
            pending.append((start, executor.submit(_process, indices, config)))
        while pending:
            start, future = pending.popleft()
            result = future.result()
            for next_start, indices in itertools.islice(queue, 1):
                pending.append((next_start, executor.submit(_process, indices, config)))
            yield (start, *result)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _worker_stores(config: _Config) -> tuple[CropStore, CropStore | None]:
    """The crop (and label) store, opened once per worker process."""
    for url, options in ((config.url, config.storage_options), (config.label_url, None)):
        if url is not None and url not in _STORES:
            _STORES[url] = open_crops(url, storage_options=options)
    return _STORES[config.url], _STORES.get(config.label_url)


def _process(indices: np.ndarray, config: _Config, stores=None) -> tuple[np.ndarray, np.ndarray]:
    """Read, segment and measure one batch of crops (in a worker process unless ``stores``)."""
    store, labels = _worker_stores(config) if stores is None else stores
    crops = store.take(indices)
    label_crops = None if labels is None else labels.take(indices)
    scale = np.asarray(config.scale)[None, :, None, None]
    pixels = crops[:, list(config.channels)].astype(np.float64) / scale
    pixels[~np.isfinite(pixels)] = 0.0  # float stores may hold NaN
    nuclei = np.zeros((len(indices), *crops.shape[2:]), dtype=bool)
    cells = np.zeros_like(nuclei)
    for i in range(len(indices)):
        label_crop = None if label_crops is None else label_crops[i]
        nuclei[i], cells[i] = objects(pixels[i], crops[i], label_crop, config)
    values = np.full((len(indices), len(config.columns)), np.nan, dtype=np.float32)
    position = {name: j for j, name in enumerate(config.columns)}
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        slots = indices % config.chunk_cells
        n_overflow = 0
        for name, (rows, column) in _measure(pixels, nuclei, cells, slots, config).items():
            if name in position:  # always, as every batch has the same measurements
                n_overflow += int((np.abs(column) > _FLOAT32_MAX).sum())  # inf in float32
                values[rows, position[name]] = column
    missing = np.array(
        [(~nuclei.any(axis=(1, 2))).sum(), (~cells.any(axis=(1, 2))).sum(), n_overflow]
    )
    return values, missing


def _measurements() -> tuple[dict, dict]:
    """cp-measure's functions, with its numba kernels where it has them.

    The kernels give the same values; texture at 256 grey levels runs 100 times faster.
    """
    from cp_measure.bulk import get_core_measurements, get_correlation_measurements

    core = get_core_measurements(sanitize=False)
    try:
        from cp_measure.core.numba._feret import get_feret
        from cp_measure.core.numba.measureobjectintensity import get_intensity
        from cp_measure.core.numba.measuretexture import get_texture
    except ImportError:  # numba missing: the numpy versions
        logger.info("numba is not installed; measuring texture with mahotas (slow).")
    else:
        core = {**core, "intensity": get_intensity, "texture": get_texture, "feret": get_feret}
    return core, get_correlation_measurements(sanitize=False)


def _mosaic(masks: np.ndarray, pixels: np.ndarray):
    """Pack the objects' bounding boxes into one image, ``_PAD`` background pixels apart.

    Per-object measurements see only their object's pixels, so measuring all objects of a batch
    in one call gives each the values it would get alone, without the per-call overhead.
    Returns the rows measured, a label image (object ``k`` is row ``rows[k - 1]``) and the
    channels' mosaic.
    """
    from scipy import ndimage as ndi

    rows = np.flatnonzero(masks.any(axis=(1, 2)))
    boxes = [ndi.find_objects(masks[row].astype(np.int8))[0] for row in rows]
    sizes = np.array([[b[0].stop - b[0].start, b[1].stop - b[1].start] for b in boxes]).reshape(
        -1, 2
    )
    # shelf packing: left to right in rows about as wide as the mosaic is tall
    width = max(
        int(math.sqrt(((sizes + _PAD).prod(axis=1)).sum())), int(sizes[:, 1].max(initial=0))
    )
    places, y, x, shelf = [], _PAD, _PAD, 0
    for height, w in sizes:
        if x + w > width + _PAD and x > _PAD:
            y, x, shelf = y + shelf + _PAD, _PAD, 0
        places.append((y, x))
        x, shelf = x + w + _PAD, max(shelf, height)
    labels = np.zeros((y + shelf + _PAD, width + 2 * _PAD), dtype=np.int32)
    mosaic = np.zeros((pixels.shape[1], *labels.shape))
    for k, (row, box, (y, x)) in enumerate(zip(rows, boxes, places, strict=True)):
        h, w = box[0].stop - box[0].start, box[1].stop - box[1].start
        labels[y : y + h, x : x + w][masks[row][box]] = k + 1
        mosaic[:, y : y + h, x : x + w] = pixels[row][(slice(None), *box)]
    return rows, labels, mosaic


def _name(obj: str, family: str, key: str, channel: str | None) -> tuple[str, str]:
    """CellProfiler's feature name and the measurement part of a cp-measure key."""
    category = _CATEGORY[family]
    measurement = key.removeprefix(f"{category}_")
    if channel is None:
        return f"{obj}_{category}_{measurement}", measurement
    if family == "granularity":
        return f"{obj}_{category}_{measurement}_{channel}", measurement
    parts = _TRAILING_PARAMS.match(measurement)
    return f"{obj}_{category}_{parts['head']}_{channel}{parts['params']}", measurement


def _measure(pixels, nuclei, cells, slots, config: _Config, *, meta: dict | None = None):
    """``{feature name: (rows, values)}`` for a batch of crops and their object masks.

    ``slots`` are the crops' indices within their store chunk (unique within a batch).
    """
    core, corr = _measurements()
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    channels = config.channel_names

    def put(obj, family, key, channel, rows, values, *, pair=None):
        if _DROPPED.match(key):
            return
        name, measurement = _name(obj, family, key, channel)
        if pair is not None:  # colocalisation: CellProfiler puts both channels last
            name, channel = f"{name}_{pair[0]}_{pair[1]}", f"{pair[0]}:{pair[1]}"
        out[name] = (rows, np.asarray(values, dtype=np.float64))
        if meta is not None:
            meta[name] = (obj, channel or "", family, measurement)

    for obj, masks in zip(OBJECTS, (nuclei, cells), strict=True):
        rows, labels, mosaic = _mosaic(masks, pixels)
        if rows.size == 0:
            continue
        shape_zernikes, radial_zernikes = _zernikes(
            core, masks, pixels, rows, slots, config.chunk_cells, config.families
        )
        for family in config.families:
            if family == "sizeshape":
                for fn in (core["sizeshape"], core["feret"]):
                    for key, values in fn(labels, None).items():
                        put(obj, family, key, None, rows, values)
                for key, values in shape_zernikes.items():
                    put(obj, family, key, None, rows, values)
            elif family == "colocalization":
                for pair in itertools.combinations(range(len(channels)), 2):
                    _colocalization(
                        put, corr, obj, rows, labels, mosaic, channels, pair, config.costes
                    )
            elif family == "granularity":
                _granularity(put, core["granularity"], obj, rows, masks, pixels, channels)
            else:
                fn = core[family]
                # texture quantises [0, 1] to 256 grey levels
                image = np.clip(mosaic, 0.0, 1.0) if family == "texture" else mosaic
                for c, channel in enumerate(channels):
                    for key, values in fn(labels, image[c]).items():
                        put(obj, family, key, channel, rows, values)
                    if family == "radial_distribution":
                        for key, values in radial_zernikes.items():
                            put(obj, family, key, channel, rows, values[:, c])
    return out


def _zernikes(core, masks, pixels, rows, slots, n_slots, families) -> tuple[dict, dict]:
    """Shape and radial Zernike moments, each crop at a place fixed by its index in the chunk.

    Zernike moments count the pixels in each object's enclosing circle, and pixels on the circle
    fall in or out with the rounding of their coordinates, so a crop is always measured at the
    same place of a fixed grid, whatever else is measured with it.
    """
    shape, radial = "sizeshape" in families, "radial_distribution" in families
    if not (shape or radial):
        return {}, {}
    height, width = masks.shape[1:]
    n_cols = max(1, math.isqrt(n_slots))  # a fixed grid: a crop's place depends on its slot only
    n_rows = -(-n_slots // n_cols)
    labels = np.zeros((n_rows * (height + _PAD) + _PAD, n_cols * (width + _PAD) + _PAD), np.int32)
    canvas = np.zeros((pixels.shape[1], *labels.shape))
    for k, row in enumerate(rows):
        y = _PAD + (slots[row] // n_cols) * (height + _PAD)
        x = _PAD + (slots[row] % n_cols) * (width + _PAD)
        labels[y : y + height, x : x + width][masks[row]] = k + 1
        canvas[:, y : y + height, x : x + width] = pixels[row]
    shape_out = core["zernike"](labels, None) if shape else {}
    radial_out: dict[str, np.ndarray] = {}
    for c in range(canvas.shape[0] if radial else 0):
        for key, values in core["radial_zernikes"](labels, canvas[c]).items():
            radial_out.setdefault(key, np.empty((rows.size, canvas.shape[0])))[:, c] = values
    return shape_out, radial_out


def _colocalization(put, corr, obj, rows, labels, mosaic, channels, pair, costes) -> None:
    first, second = mosaic[pair[0]], mosaic[pair[1]]
    results = {
        **corr["pearson"](first, second, labels),
        **corr["manders_fold"](first, second, labels),
        **corr["rwc"](first, second, labels),
    }
    if costes:  # thresholds searched on a 0-255 grid of values in [0, 1]
        clipped = np.clip(first, 0, 1), np.clip(second, 0, 1)
        results.update(corr["costes"](*clipped, labels, scale_max=_COSTES_SCALE))
    a, b = pair
    for key, values in results.items():
        measurement = key.removeprefix("Correlation_")
        pair = (channels[a], channels[b])
        if measurement == "Pearson":
            measurement = "Correlation"
        elif measurement.endswith("_2"):  # the fraction of the second channel's signal
            pair = pair[::-1]
        measurement = measurement.removesuffix("_1").removesuffix("_2")
        put(obj, "colocalization", f"Correlation_{measurement}", None, rows, values, pair=pair)


def _granularity(put, fn, obj, rows, masks, pixels, channels) -> None:
    for c, channel in enumerate(channels):
        columns: dict[str, list[float]] = {}
        for row in rows:
            for key, values in fn(masks[row].astype(np.int32), pixels[row, c]).items():
                columns.setdefault(key, []).append(float(values[0]))
        for key, values in columns.items():
            put(obj, "granularity", key, channel, rows, values)
