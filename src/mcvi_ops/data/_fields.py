"""scvi-tools AnnData field that registers linked image crops."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import rich
from anndata import AnnData
from scvi.data.fields import BaseAnnDataField, CategoricalObsField

from ._link import DEFAULT_INDEX_KEY, UNS_KEY, _check_indices, crop_reference, linked_store

logger = logging.getLogger(__name__)


class ImageField(BaseAnnDataField):
    """Register the image crops tied to each AnnData row with an :class:`~scvi.data.AnnDataManager`.

    The field's data is the obs column of integer crop indices written by
    :func:`~mcvi_ops.data.link_crops`; data loaders use it to read the crops from the linked
    :class:`~mcvi_ops.data.CropStore`. Registration checks that the store can be opened, that every
    index is in range, and records the channel names, crop size and pixel type, so a model can be
    reused on new data only when those match.

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
        }

    def register_field(self, adata: AnnData) -> dict:
        """Validate ``adata`` and record the store's layout."""
        self.validate_field(adata)
        return self._state()

    def transfer_field(self, state_registry: dict, adata_target: AnnData, **kwargs) -> dict:
        """Register query data whose crops have the same channels and crop size as the reference."""
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
        return state

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
        )
        for key in keys:
            table.add_row(key, str(state_registry[key]))
        return table

    def get_field_data(self, adata: AnnData) -> np.ndarray:
        """The integer crop index of every row."""
        return adata.obs[self._index_key].to_numpy()


class PerturbationField(CategoricalObsField):
    """Register a perturbation categorical whose control category always has code 0.

    Parameters
    ----------
    registry_key
        Key under which models find the perturbation codes.
    attr_key
        Column of ``adata.obs`` naming each cell's perturbation (e.g. ``"gene_symbol"``).
    control_category
        The category of control cells (e.g. ``"nontargeting"``).
    """

    CONTROL_CATEGORY_KEY = "control_category"

    def __init__(self, registry_key: str, attr_key: str, *, control_category: str) -> None:
        super().__init__(registry_key, attr_key)
        self.control_category = control_category

    def validate_field(self, adata: AnnData) -> None:
        """Check the column exists and holds the control category."""
        key = self._original_attr_key
        if key not in adata.obs:
            msg = (
                f"Perturbation column {key!r} not found in adata.obs (columns: "
                f"{list(adata.obs.columns)}). Pass `perturbation_key=` naming the column of "
                "perturbations (e.g. 'gene_symbol' or 'sgRNA')."
            )
            raise KeyError(msg)

    def _ordered_categories(self, adata: AnnData) -> list:
        column = adata.obs[self._original_attr_key]
        if column.isna().any():
            msg = (
                f"adata.obs[{self._original_attr_key!r}] has {int(column.isna().sum())} missing "
                "values; every cell needs a perturbation (controls included). Drop those cells or "
                "fill them in."
            )
            raise ValueError(msg)
        counts = column.astype("category").value_counts()
        if self.control_category not in counts.index or counts[self.control_category] == 0:
            examples = [str(c) for c in counts.index[:5]]
            msg = (
                f"Control category {self.control_category!r} has no cells in "
                f"adata.obs[{self._original_attr_key!r}] (categories include {examples}). Pass "
                "`control_category=` naming the control perturbation (e.g. 'nontargeting')."
            )
            raise ValueError(msg)
        empty = counts.index[counts == 0].tolist()
        if empty:
            msg = (
                f"Perturbations {empty[:5]} of adata.obs[{self._original_attr_key!r}] have no "
                f"cells. Remove unused categories first: `adata.obs[{self._original_attr_key!r}] = "
                f"adata.obs[{self._original_attr_key!r}].cat.remove_unused_categories()`."
            )
            raise ValueError(msg)
        if len(counts) < 2:
            msg = (
                f"adata.obs[{self._original_attr_key!r}] holds only the control category; at "
                "least one perturbation with cells is needed."
            )
            raise ValueError(msg)
        others = sorted((c for c in counts.index if c != self.control_category), key=str)
        return [self.control_category, *others]

    def register_field(self, adata: AnnData) -> dict:
        """Encode perturbations with the control category first (code 0)."""
        self.validate_field(adata)
        categories = self._ordered_categories(adata)
        # build the codes from plain values: pandas treats unordered categoricals with the same
        # categories in another order as equal, so `astype` alone would keep the old order
        values = np.asarray(adata.obs[self._original_attr_key].astype(object))
        codes = pd.Categorical(values, categories=categories).codes
        adata.obs[self.attr_key] = codes.astype(np.int64)
        mapping = np.asarray(categories, dtype=object)
        return {
            self.CATEGORICAL_MAPPING_KEY: mapping,
            self.ORIGINAL_ATTR_KEY: self._original_attr_key,
            self.CONTROL_CATEGORY_KEY: self.control_category,
        }

    def transfer_field(
        self, state_registry: dict, adata_target: AnnData, extend_categories: bool = False, **kwargs
    ) -> dict:
        """Encode query perturbations with the reference codes (control stays 0)."""
        self.validate_field(adata_target)
        state = super().transfer_field(
            state_registry, adata_target, extend_categories=extend_categories, **kwargs
        )
        state[self.CONTROL_CATEGORY_KEY] = self.control_category
        return state
