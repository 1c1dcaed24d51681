"""scvi-tools AnnData field that registers linked image crops."""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import rich
from anndata import AnnData
from scvi.data.fields import BaseAnnDataField

from ._label_fields import (
    UNKNOWN_CODE,
    BatchField,
    IntensityFactorField,
    PerturbationField,
)
from ._link import DEFAULT_INDEX_KEY, UNS_KEY, _check_indices, crop_reference, linked_store

__all__ = [
    "UNKNOWN_CODE",
    "BatchField",
    "ImageField",
    "IntensityFactorField",
    "IntensityOption",
    "PerturbationField",
]

logger = logging.getLogger(__name__)

IntensityOption = Literal["check", "rescale", "as_is"]

#: query crops whose intensity span differs from the training crops' by more than this factor
#: in any channel are on another scale (uint8 vs uint16, [0, 1] floats): refused by default
SCALE_TOLERANCE = 10.0
#: percentiles of the per-channel intensity range recorded for stores that lack one
_RANGE_PERCENTILES = (0.1, 99.9)
_RANGE_SAMPLE_CHUNKS = 4


def _store_intensity_range(store) -> list[list[float]] | None:
    """Per-channel ``[low, high]`` intensities of a store: its own record, else a small sample."""
    recorded = getattr(store, "intensity_range", None)
    if recorded is not None:
        return [[float(lo), float(hi)] for lo, hi in recorded]
    if store.n_cells == 0:
        return None
    picks = np.unique(
        np.linspace(0, store.n_chunks - 1, min(_RANGE_SAMPLE_CHUNKS, store.n_chunks)).round()
    )
    sample = np.concatenate([store.read_chunk(int(k)) for k in picks]).astype(np.float64)
    flat = sample.transpose(1, 0, 2, 3).reshape(sample.shape[1], -1)
    flat = np.where(np.isfinite(flat), flat, np.nan)
    with np.errstate(all="ignore"):
        low, high = np.nanpercentile(flat, _RANGE_PERCENTILES, axis=1)
    return [[float(lo), float(hi)] for lo, hi in zip(low, high, strict=True)]


def _scale_mismatch(query: list, reference: list) -> list[int]:
    """Channels whose intensity span differs by more than :data:`SCALE_TOLERANCE` times."""
    bad = []
    for channel, ((q_lo, q_hi), (r_lo, r_hi)) in enumerate(zip(query, reference, strict=True)):
        q_span, r_span = max(q_hi - q_lo, 1e-12), max(r_hi - r_lo, 1e-12)
        if not 1 / SCALE_TOLERANCE <= q_span / r_span <= SCALE_TOLERANCE:
            bad.append(channel)
    return bad


def _format_range(ranges: list | None) -> str:
    if ranges is None:
        return "unknown"
    return ", ".join(f"[{lo:.4g}, {hi:.4g}]" for lo, hi in ranges)


class ImageField(BaseAnnDataField):
    """Register the image crops tied to each AnnData row with an :class:`~scvi.data.AnnDataManager`.

    The field's data is the obs column of integer crop indices written by
    :func:`~mcvi_ops.data.link_crops`; data loaders use it to read the crops from the linked
    :class:`~mcvi_ops.data.CropStore`. Registration checks that the store can be opened, that every
    index is in range (and that the store is still the one the AnnData was linked to), and records
    the channel names, crop size, pixel type, intensity range and store identifier, so a model can
    be reused on new data only when those match.

    Query data (:meth:`transfer_field`) must have the same channels and crop size. Crops of
    another pixel type or intensity scale (uint8 instead of uint16, floats in [0, 1]) are refused
    unless ``intensity="rescale"`` (map each channel's intensity range linearly onto the
    training one; the map is recorded as ``intensity_map``) or ``intensity="as_is"`` (the values
    are on the training scale despite the type) is passed.

    Parameters
    ----------
    registry_key
        Key under which models find the crop indices (e.g. ``"crops"``).
    index_key
        The obs column of crop indices written by :func:`~mcvi_ops.data.link_crops`
        (``"crop_index"`` by default). Models read it from ``adata.uns[uns_key]["index_key"]``.
    uns_key
        Key of the store reference in ``adata.uns``.

    Examples
    --------
    >>> import mcvi_ops
    >>> from scvi.data import AnnDataManager
    >>> from mcvi_ops.data import ImageField
    >>> adata = mcvi_ops.datasets.synthetic_screen(n_cells=200, n_genes=10, seed=0)
    >>> manager = AnnDataManager(fields=[ImageField("crops")])
    >>> manager.register_fields(adata)
    >>> manager.summary_stats["n_channels"]
    4
    """

    URL_KEY = "url"
    INDEX_KEY = "index_key"
    N_CROPS_KEY = "n_crops"
    CHANNEL_NAMES_KEY = "channel_names"
    CROP_SIZE_KEY = "crop_size"
    DTYPE_KEY = "dtype"
    STORE_ID_KEY = "store_id"
    INTENSITY_RANGE_KEY = "intensity_range"
    INTENSITY_MAP_KEY = "intensity_map"

    def __init__(
        self, registry_key: str, *, index_key: str | None = None, uns_key: str = UNS_KEY
    ) -> None:
        super().__init__()
        self._registry_key = registry_key
        self._uns_key = uns_key
        self._index_key = DEFAULT_INDEX_KEY if index_key is None else index_key

    @property
    def registry_key(self) -> str:
        """Key under which models find the crop indices."""
        return self._registry_key

    @property
    def attr_name(self) -> str:
        """Crop indices live in ``adata.obs``."""
        return "obs"

    @property
    def attr_key(self) -> str:
        """The obs column of crop indices."""
        return self._index_key

    @property
    def uns_key(self) -> str:
        """Key of the store reference in ``adata.uns``."""
        return self._uns_key

    @property
    def is_empty(self) -> bool:
        """An image field is never empty."""
        return False

    def validate_field(self, adata: AnnData) -> None:
        """Check that ``adata`` is linked to a reachable store and every index is in range."""
        reference = crop_reference(adata, uns_key=self._uns_key)
        try:
            store = linked_store(adata, uns_key=self._uns_key)
        except FileNotFoundError as err:
            msg = (
                f"The crop store {reference['url']!r} linked in adata.uns[{self._uns_key!r}] cannot "
                "be opened. If it moved, relink with `mcvi_ops.data.link_crops(adata, new_path, "
                f"index_key={reference['index_key']!r})`."
            )
            raise FileNotFoundError(msg) from err
        if reference["index_key"] != self._index_key:
            msg = (
                f"The crops are linked through adata.obs[{reference['index_key']!r}] but this field "
                f"reads adata.obs[{self._index_key!r}]. Create the field with "
                f"`index_key={reference['index_key']!r}`."
            )
            raise ValueError(msg)
        _check_indices(adata.obs[self._index_key], store.n_cells, self._index_key)
        self._store = store

    def _state(self) -> dict:
        store = self._store
        return {
            self.URL_KEY: store.url,
            self.INDEX_KEY: self._index_key,
            self.N_CROPS_KEY: int(store.n_cells),
            self.CHANNEL_NAMES_KEY: list(store.channel_names),
            self.CROP_SIZE_KEY: [int(s) for s in store.crop_size],
            self.DTYPE_KEY: str(store.dtype),
            self.STORE_ID_KEY: getattr(store, "store_id", None),
            self.INTENSITY_RANGE_KEY: _store_intensity_range(store),
        }

    def register_field(self, adata: AnnData) -> dict:
        """Validate ``adata`` and record the store's layout."""
        self.validate_field(adata)
        return self._state()

    def transfer_field(
        self,
        state_registry: dict,
        adata_target: AnnData,
        *,
        intensity: IntensityOption = "check",
        **kwargs,
    ) -> dict:
        """Register query data whose crops match the reference's channels, size and scale.

        Parameters
        ----------
        state_registry
            The reference's state (from :meth:`register_field`).
        adata_target
            The query AnnData, linked to its crops.
        intensity
            ``"check"`` refuses crops of another pixel type or intensity scale; ``"rescale"``
            maps each channel's intensity range linearly onto the reference's (recorded as
            ``intensity_map``, ``[scale, offset]`` per channel, applied by the models);
            ``"as_is"`` uses the values unchanged.
        **kwargs
            Ignored (options of other fields).
        """
        if intensity not in ("check", "rescale", "as_is"):
            msg = f"`intensity` must be 'check', 'rescale' or 'as_is', got {intensity!r}."
            raise ValueError(msg)
        self.validate_field(adata_target)
        state = self._state()
        expected = state_registry[self.CHANNEL_NAMES_KEY]
        if state[self.CHANNEL_NAMES_KEY] != list(expected):
            msg = (
                f"The query crops have channels {state[self.CHANNEL_NAMES_KEY]} but the model was "
                f"set up with {list(expected)}. Write the query crops with the same channels in the "
                "same order."
            )
            raise ValueError(msg)
        expected_size = [int(s) for s in state_registry[self.CROP_SIZE_KEY]]
        if state[self.CROP_SIZE_KEY] != expected_size:
            msg = (
                f"The query crops are {state[self.CROP_SIZE_KEY][0]}x{state[self.CROP_SIZE_KEY][1]} "
                f"px but the model was set up with {expected_size[0]}x{expected_size[1]} px crops. "
                "Crop (or resize) the query cells to the same size."
            )
            raise ValueError(msg)
        self._check_intensity(state, state_registry, intensity)
        return state

    def _check_intensity(self, state: dict, reference: dict, intensity: IntensityOption) -> None:
        """Refuse, or record the map of, query crops on another intensity scale."""
        if intensity == "as_is":
            return
        ref_range = reference.get(self.INTENSITY_RANGE_KEY)
        query_range = state[self.INTENSITY_RANGE_KEY]
        ref_dtype, query_dtype = reference.get(self.DTYPE_KEY), state[self.DTYPE_KEY]
        if intensity == "rescale":
            if ref_range is None or query_range is None:
                msg = (
                    "`intensity='rescale'` needs the intensity range of both the training and "
                    "the query crops, but "
                    f"{'the model' if ref_range is None else 'the query store'} did not record "
                    "one. Convert the query crops to the training scale yourself, or pass "
                    "`intensity='as_is'`."
                )
                raise ValueError(msg)
            intensity_map = []
            for (q_lo, q_hi), (r_lo, r_hi) in zip(query_range, ref_range, strict=True):
                scale = (r_hi - r_lo) / max(q_hi - q_lo, 1e-12)
                intensity_map.append([float(scale), float(r_lo - q_lo * scale)])
            state[self.INTENSITY_MAP_KEY] = intensity_map
            logger.info(
                "Query crops rescaled per channel from %s onto the training range %s",
                _format_range(query_range),
                _format_range(ref_range),
            )
            return
        channels = state[self.CHANNEL_NAMES_KEY]
        off_scale = (
            _scale_mismatch(query_range, ref_range)
            if ref_range is not None and query_range is not None
            else []
        )
        other_dtype = ref_dtype is not None and query_dtype != ref_dtype
        if not (off_scale or other_dtype):
            return
        what = (
            f"{query_dtype} but the model was trained on {ref_dtype} crops"
            if other_dtype
            else "on another intensity scale than the training crops"
        )
        if off_scale:
            detail = (
                f"channels {[channels[c] for c in off_scale]} span intensities "
                f"{_format_range([query_range[c] for c in off_scale])} where the training crops "
                f"span {_format_range([ref_range[c] for c in off_scale])}"
            )
        else:
            detail = (
                f"intensities {_format_range(query_range)} (training: {_format_range(ref_range)})"
            )
        msg = (
            f"The query crops are {what} ({detail}); embedding them as they are can feed the "
            "model nearly constant inputs. Write the query crops on the training scale, or "
            "register them with `model.setup_query(adata, intensity='rescale')` to map each "
            "channel's intensity range linearly onto the training one (or `intensity='as_is'` "
            "if the values are on the training scale already)."
        )
        raise ValueError(msg)

    def get_summary_stats(self, state_registry: dict) -> dict:
        """Number of channels and crop height/width."""
        height, width = state_registry[self.CROP_SIZE_KEY]
        return {
            "n_channels": len(state_registry[self.CHANNEL_NAMES_KEY]),
            "crop_height": int(height),
            "crop_width": int(width),
        }

    def view_state_registry(self, state_registry: dict) -> rich.table.Table | None:
        """A table of the registered crop store."""
        table = rich.table.Table(title="Image crops")
        table.add_column("Property", style="dodger_blue1")
        table.add_column("Value", style="bright_cyan")
        keys = (
            self.URL_KEY,
            self.INDEX_KEY,
            self.N_CROPS_KEY,
            self.CHANNEL_NAMES_KEY,
            self.CROP_SIZE_KEY,
            self.DTYPE_KEY,
            self.STORE_ID_KEY,
            self.INTENSITY_RANGE_KEY,
            self.INTENSITY_MAP_KEY,
        )
        for key in keys:
            if key in state_registry:  # registries saved by older versions lack the newer keys
                value = state_registry[key]
                table.add_row(key, _format_range(value) if "intensity" in key else str(value))
        return table

    def get_field_data(self, adata: AnnData) -> np.ndarray:
        """The integer crop index of every row."""
        return adata.obs[self._index_key].to_numpy()
