"""scvi-tools field of a per-cell feature table: numeric values, the same features on query cells."""

from __future__ import annotations

import numpy as np
from anndata import AnnData
from scvi.data.fields import LayerField


class FeatureField(LayerField):
    """Register ``.X`` or a layer of numeric per-cell features (not counts).

    Set-up refuses non-numeric values; query cells (:meth:`transfer_field`) must carry the same
    features, by name and in the same order, as the cells the model was set up with.

    Parameters
    ----------
    registry_key
        Key under which models find the features.
    layer
        Layer of ``adata.layers`` holding the features; `None` uses ``.X``.
    """

    def __init__(self, registry_key: str, layer: str | None) -> None:
        super().__init__(registry_key, layer, is_count_data=False)

    def _where(self) -> str:
        return "adata.X" if self.attr_key is None else f"adata.layers[{self.attr_key!r}]"

    def validate_field(self, adata: AnnData) -> None:
        """Check the features exist and are numbers."""
        if self.attr_key is not None and self.attr_key not in adata.layers:
            msg = (
                f"Layer {self.attr_key!r} not found (layers: {list(adata.layers.keys())}). Pass "
                "`layer=None` to use adata.X, or the layer holding the features."
            )
            raise KeyError(msg)
        values = self.get_field_data(adata)
        if values is None:
            msg = f"{self._where()} is empty; the model needs a cells x features table there."
            raise ValueError(msg)
        dtype = values.dtype if hasattr(values, "dtype") else np.asarray(values).dtype
        if not (np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)):
            msg = (
                f"{self._where()} holds values of type {dtype}, not numbers. Keep only numeric "
                "feature columns in it (metadata such as well or gene belong in adata.obs) and "
                "convert them, e.g. `adata.X = adata.X.astype(np.float32)`."
            )
            raise TypeError(msg)
        if values.shape[1] == 0:
            msg = f"{self._where()} has no features (shape {values.shape})."
            raise ValueError(msg)

    def transfer_field(self, state_registry: dict, adata_target: AnnData, **kwargs) -> dict:
        """Register query cells; their features must be the model's, by name and order."""
        expected = [str(v) for v in state_registry[self.COLUMN_NAMES_KEY]]
        given = [str(v) for v in adata_target.var_names]
        if given != expected:
            missing = [v for v in expected if v not in set(given)]
            extra = [v for v in given if v not in set(expected)]
            if not missing and not extra:
                fix = "reorder them with `adata = adata[:, model_features].copy()`"
            else:
                fix = "compute the same features for these cells, or subset both tables to shared ones"
            msg = (
                f"The cells to embed have other features than the model was trained on: "
                f"{len(given)} vs {len(expected)} features, {len(missing)} missing (e.g. "
                f"{missing[:3]}), {len(extra)} unknown (e.g. {extra[:3]}). Give them exactly the "
                f"training features in the same order ({fix}; `model_features` is "
                "`model.adata_manager.get_state_registry('X')['column_names']`)."
            )
            raise ValueError(msg)
        self.validate_field(adata_target)
        return super().transfer_field(state_registry, adata_target, **kwargs)
