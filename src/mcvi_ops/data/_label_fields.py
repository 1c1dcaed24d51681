"""scvi-tools fields of the cells' labels: perturbation, batch and intensity factors.

At set-up every cell needs a perturbation (and a batch, if one is registered); query cells
(``transfer_field``) need neither, since the encoders read only the crops: cells without the
column, with missing values or with values the model never saw get code ``-1`` and are embedded
all the same. Intensity factors are checked the same way at set-up and on query cells.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from anndata import AnnData
from scvi.data.fields import CategoricalObsField, ObsmField

logger = logging.getLogger(__name__)

#: code of query cells without a usable label (no column, NaN, or a batch the model never saw)
UNKNOWN_CODE = -1


def _match_codes(
    column: pd.Series | None, mapping: list, n_obs: int, *, extend: bool
) -> tuple[np.ndarray, list, int, list]:
    """Codes of ``column`` in ``mapping``, matching values by equality or by their text.

    Missing values (and a missing column) get :data:`UNKNOWN_CODE`; values not in ``mapping``
    are appended to it (``extend=True``) or get :data:`UNKNOWN_CODE`. Returns the codes, the
    (extended) mapping, the number of cells without a value and the unseen values.
    """
    if column is None:
        return np.full(n_obs, UNKNOWN_CODE, dtype=np.int64), list(mapping), n_obs, []
    values = column.astype(object).to_numpy() if len(column) else np.zeros(0, dtype=object)
    inverse, uniques = pd.factorize(values, use_na_sentinel=True)
    exact = {value: code for code, value in enumerate(mapping)}
    by_text = {str(value): code for code, value in enumerate(mapping)}
    mapping = list(mapping)
    unseen: list = []
    codes_of_uniques = np.empty(len(uniques), dtype=np.int64)
    for i, value in enumerate(uniques):
        try:
            code = exact.get(value)
        except TypeError:  # unhashable values never match
            code = None
        if code is None:
            code = by_text.get(str(value))
        if code is None:
            unseen.append(value)
            if extend:
                code = len(mapping)
                mapping.append(value)
                by_text[str(value)] = code
            else:
                code = UNKNOWN_CODE
        codes_of_uniques[i] = code
    codes = np.where(inverse < 0, UNKNOWN_CODE, codes_of_uniques[np.maximum(inverse, 0)])
    return codes.astype(np.int64), mapping, int((inverse < 0).sum()), unseen


def _refuse_missing(column: pd.Series, key: str, what: str) -> None:
    missing = column.isna().to_numpy()
    if missing.any():
        rows = [str(r) for r in column.index[missing][:5]]
        msg = (
            f"adata.obs[{key!r}] has {int(missing.sum())} missing (NaN) values, e.g. cells {rows};"
            f" every cell needs a {what} to train on. Fill them in (e.g. "
            f"`adata.obs[{key!r}] = adata.obs[{key!r}].astype(str)` to make 'nan' a category of "
            "its own) or drop those cells (`adata = adata[adata.obs"
            f"[{key!r}].notna()].copy()`)."
        )
        raise ValueError(msg)


class PerturbationField(CategoricalObsField):
    """Register a perturbation categorical whose control category always has code 0.

    The control category matches a category equal to it or, for integer labels given as text
    (the command line's ``--control-category 60``), one whose text equals it. Query cells
    (:meth:`transfer_field`) need no label at all: cells without the column, with a missing
    value or with a perturbation the model never saw are registered too (code ``-1``), since
    the encoders do not read the label; training refuses such cells.

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
    N_UNLABELLED_KEY = "n_unlabelled"
    N_UNSEEN_KEY = "n_unseen"

    def __init__(self, registry_key: str, attr_key: str, *, control_category: str) -> None:
        super().__init__(registry_key, attr_key)
        self.control_category = control_category

    def validate_field(self, adata: AnnData) -> None:
        """Check the column exists."""
        key = self._original_attr_key
        if key not in adata.obs:
            msg = (
                f"Perturbation column {key!r} not found in adata.obs (columns: "
                f"{list(adata.obs.columns)}). Pass `perturbation_key=` naming the column of "
                "perturbations (e.g. 'gene_symbol' or 'sgRNA')."
            )
            raise KeyError(msg)

    def _control_value(self, categories: pd.Index):
        """The category that is the control: equal to ``control_category``, or equal as text."""
        if self.control_category in categories:
            return self.control_category
        same_text = [c for c in categories if str(c) == str(self.control_category)]
        return same_text[0] if len(same_text) == 1 else None

    def _ordered_categories(self, adata: AnnData) -> list:
        column = adata.obs[self._original_attr_key]
        _refuse_missing(column, self._original_attr_key, "perturbation (controls included)")
        counts = column.astype("category").value_counts()
        control = self._control_value(counts.index)
        if control is None or counts[control] == 0:
            examples = list(counts.index[:5])
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
        others = sorted((c for c in counts.index if c != control), key=str)
        return [control, *others]

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

    def transfer_field(self, state_registry: dict, adata_target: AnnData, **kwargs) -> dict:
        """Encode query perturbations with the reference codes (control stays 0).

        Cells without a label (no column, NaN) or with a perturbation the model never saw get
        code ``-1``; neither changes an embedding. The categories stay the reference's, so a
        model loaded with query cells is built exactly as trained.
        """
        key = self._original_attr_key
        column = adata_target.obs[key] if key in adata_target.obs else None
        mapping = list(state_registry[self.CATEGORICAL_MAPPING_KEY])
        codes, _, n_missing, unseen = _match_codes(
            column, mapping, adata_target.n_obs, extend=False
        )
        adata_target.obs[self.attr_key] = codes
        n_unseen = int((codes == UNKNOWN_CODE).sum()) - n_missing
        if n_missing or n_unseen:
            logger.info(
                "%d of %d query cells have no perturbation label in adata.obs[%r] and %d one the "
                "model never saw (e.g. %s); they are embedded all the same (the encoders do not "
                "read the label).",
                n_missing,
                adata_target.n_obs,
                key,
                n_unseen,
                [str(u) for u in unseen[:3]],
            )
        return {
            self.CATEGORICAL_MAPPING_KEY: np.asarray(mapping, dtype=object),
            self.ORIGINAL_ATTR_KEY: key,
            self.CONTROL_CATEGORY_KEY: state_registry.get(
                self.CONTROL_CATEGORY_KEY, self.control_category
            ),
            self.N_UNLABELLED_KEY: n_missing,
            self.N_UNSEEN_KEY: n_unseen,
        }

    def get_summary_stats(self, state_registry: dict) -> dict:
        """Number of categories (labels of mixed types counted too)."""
        mapping = pd.Series(list(state_registry[self.CATEGORICAL_MAPPING_KEY]), dtype=object)
        return {self.count_stat_key: len(pd.unique(mapping))}


class BatchField(CategoricalObsField):
    """Register a technical batch: no missing values at set-up; any values on query cells.

    The decoder reads the batch, the encoders do not: query cells (:meth:`transfer_field`)
    without the column, with a missing value or with a batch the model never saw get code
    ``-1`` and can be embedded, not reconstructed.

    Parameters
    ----------
    registry_key
        Key under which models find the batch codes.
    attr_key
        Column of ``adata.obs`` naming each cell's batch.
    """

    N_UNKNOWN_KEY = "n_unknown"

    def get_summary_stats(self, state_registry: dict) -> dict:
        """Number of batches (labels of mixed types counted too)."""
        mapping = pd.Series(list(state_registry[self.CATEGORICAL_MAPPING_KEY]), dtype=object)
        return {self.count_stat_key: len(pd.unique(mapping))}

    def validate_field(self, adata: AnnData) -> None:
        """Check the column exists and has no missing values."""
        key = self._original_attr_key
        if key not in adata.obs:
            msg = (
                f"Batch column {key!r} not found in adata.obs (columns: "
                f"{list(adata.obs.columns)[:15]}). Pass an existing column as `batch_key=` (e.g. "
                "one combining plate and well), or `batch_key=None`."
            )
            raise KeyError(msg)
        _refuse_missing(adata.obs[key], key, "batch")

    def transfer_field(self, state_registry: dict, adata_target: AnnData, **kwargs) -> dict:
        """Encode query batches with the reference codes; unknown or missing ones as ``-1``."""
        key = self._original_attr_key
        column = adata_target.obs[key] if key in adata_target.obs else None
        mapping = list(state_registry[self.CATEGORICAL_MAPPING_KEY])
        codes, _, n_missing, unseen = _match_codes(
            column, mapping, adata_target.n_obs, extend=False
        )
        adata_target.obs[self.attr_key] = codes
        n_unknown = int((codes == UNKNOWN_CODE).sum())
        if n_unknown:
            logger.info(
                "%d of %d query cells have no batch in adata.obs[%r] (%d missing, batches the "
                "model never saw: %s); they can be embedded (the encoders do not read the batch) "
                "but not reconstructed.",
                n_unknown,
                adata_target.n_obs,
                key,
                n_missing,
                [str(u) for u in unseen[:3]],
            )
        return {
            self.CATEGORICAL_MAPPING_KEY: np.asarray(mapping, dtype=object),
            self.ORIGINAL_ATTR_KEY: key,
            self.N_UNKNOWN_KEY: n_unknown,
        }


class IntensityFactorField(ObsmField):
    """Register per-cell, per-channel intensity factors: positive and finite, at set-up and query.

    Parameters
    ----------
    registry_key
        Key under which models find the factors.
    attr_key
        Key of ``adata.obsm`` holding them (from :func:`~mcvi_ops.pp.estimate_intensity_factors`).
    """

    def _check(self, adata: AnnData, *, query: bool) -> None:
        key = self.attr_key
        if query:
            hint = (
                f"The model was set up with intensity factors (`intensity_factor_key={key!r}`), so "
                "cells to embed need them too: estimate them on these cells' own controls with "
                f"`mcvi_ops.pp.estimate_intensity_factors(adata, key_added={key!r})` (with the "
                "batch_key the model's were fitted with)."
            )
        else:
            hint = f"Run `mcvi_ops.pp.estimate_intensity_factors(adata, key_added={key!r})` first."
        if key not in adata.obsm:
            msg = f"Did not find .obsm[{key!r}] (keys: {list(adata.obsm.keys())}). {hint}"
            raise KeyError(msg)
        factors = np.asarray(adata.obsm[key], dtype=np.float64)
        if factors.ndim != 2 or not (np.isfinite(factors).all() and (factors > 0).all()):
            bad = ~(np.isfinite(factors) & (factors > 0)) if factors.ndim == 2 else None
            rows = [str(r) for r in adata.obs_names[bad.any(axis=1)][:5]] if bad is not None else []
            msg = (
                f".obsm[{key!r}] must hold positive, finite factors of shape (n_cells, "
                f"n_channels); got shape {factors.shape} with {int((~np.isfinite(factors)).sum())}"
                f" non-finite and {int((factors <= 0).sum())} non-positive values"
                + (f" (cells {rows})" if rows else "")
                + f". {hint}"
            )
            raise ValueError(msg)

    def register_field(self, adata: AnnData) -> dict:
        """Check the factors and their dark level, then register them."""
        self._check(adata, query=False)
        key = self.attr_key
        hint = f"Run `mcvi_ops.pp.estimate_intensity_factors(adata, key_added={key!r})` first."
        info = adata.uns.get(key)
        if not isinstance(info, dict) or "dark_level" not in info:
            msg = f"Did not find the dark level in .uns[{key!r}]['dark_level']. {hint}"
            raise KeyError(msg)
        n_channels = np.asarray(adata.obsm[key]).shape[1]
        if len(info["dark_level"]) != n_channels:
            msg = (
                f".uns[{key!r}]['dark_level'] has {len(info['dark_level'])} channels but the "
                f"factors have {n_channels}. {hint}"
            )
            raise ValueError(msg)
        return super().register_field(adata)

    def transfer_field(self, state_registry: dict, adata_target: AnnData, **kwargs) -> dict:
        """Check the query cells' factors as set-up does, then register them."""
        self._check(adata_target, query=True)
        return super().transfer_field(state_registry, adata_target, **kwargs)
