"""The feature baseline (control-standardised CellProfiler-style features + PCA) and MuData."""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
from anndata import AnnData
from scipy import sparse
from sklearn.decomposition import PCA

from ._normalize import _groups, _normalize

logger = logging.getLogger(__name__)


def feature_embedding(
    features_adata: AnnData,
    *,
    batch_key: str,
    perturbation_key: str = "gene_symbol",
    control_category: str = "nontargeting",
    n_comps: int = 64,
    layer: str | None = None,
    seed: int = 0,
    key_added: str = "X_features_pca",
    method: Literal["center_scale", "tvn"] = "center_scale",
) -> np.ndarray:
    """Embed per-cell feature tables the way the paper's CellProfiler baseline does.

    .. long function: documentation and signature; the body is under 80 lines.

    Within each batch, every feature is standardised against that batch's control cells
    (subtract the control mean, divide by the control standard deviation, ``method="center_scale"``)
    or the table is TVN-normalised on the controls (``method="tvn"``, see
    :func:`~mcvi_ops.tl.normalize_to_controls`); then PCA reduces it to ``n_comps`` dimensions.
    Features without spread in the controls of some batch (or not finite there) are dropped;
    remaining non-finite values are set to 0 (the control mean) with a warning.

    Parameters
    ----------
    features_adata
        Cells x features (e.g. CellProfiler measurements) in ``.X`` or ``layer``.
    batch_key
        Obs column of the batch (e.g. plate and well, see
        :func:`~mcvi_ops.pp.derive_covariates`).
    perturbation_key, control_category
        Obs column and value that mark control cells.
    n_comps
        Number of principal components (capped at the number of features and cells).
    layer
        Layer to use instead of ``.X``.
    seed
        Random state of the PCA solver.
    key_added
        Key in ``.obsm``.
    method
        ``"center_scale"`` (the paper's baseline) or ``"tvn"``, as in
        :func:`~mcvi_ops.tl.normalize_to_controls`.

    Returns
    -------
    The embedding (cells x components). Also sets

    ``features_adata.obsm[key_added]``
        The embedding.
    ``features_adata.uns[key_added]``
        ``{"params", "variance_ratio", "features"}`` (the features kept).

    Examples
    --------
    >>> import mcvi_ops
    >>> emb = mcvi_ops.tl.feature_embedding(features, batch_key="well")  # doctest: +SKIP
    """
    x = features_adata.X if layer is None else features_adata.layers[layer]
    if x is None or features_adata.n_vars == 0:
        msg = "The feature table (.X or `layer`) is empty; put per-cell features in .X first."
        raise ValueError(msg)
    x = x.toarray() if sparse.issparse(x) else np.asarray(x)
    batches, is_ctrl = _groups(features_adata, batch_key, perturbation_key, control_category)
    x, keep_feature = _normalize(
        x,
        batches,
        is_ctrl,
        method=method,
        describe=(batch_key, perturbation_key, control_category),
    )
    n = min(n_comps, x.shape[1], x.shape[0] - 1)
    if n < n_comps:
        logger.warning("Using %d components instead of %d (data too small).", n, n_comps)
    pca = PCA(n_components=n, random_state=seed)
    emb = pca.fit_transform(x).astype(np.float32)
    features_adata.obsm[key_added] = emb
    features_adata.uns[key_added] = {
        "params": {
            "batch_key": batch_key,
            "perturbation_key": perturbation_key,
            "control_category": control_category,
            "n_comps": int(n),
            "layer": layer,
            "method": method,
        },
        "variance_ratio": pca.explained_variance_ratio_,
        "features": np.asarray(features_adata.var_names[keep_feature], dtype=str),
    }
    return emb


def to_mudata(
    image_adata: AnnData,
    features_adata: AnnData,
    *,
    image_key: str = "image",
    features_key: str = "features",
    reorder: bool = True,
):
    """Put image embeddings and feature tables of the same cells side by side in a MuData.

    Parameters
    ----------
    image_adata
        Cells with image embeddings (e.g. ``.obsm["X_mcvae"]``).
    features_adata
        The same cells with a feature table in ``.X``.
    image_key, features_key
        Modality names.
    reorder
        If both hold the same cells in a different order, reorder ``features_adata`` to the order
        of ``image_adata`` (a copy); `False` raises instead.

    Returns
    -------
    :class:`mudata.MuData` with the two modalities; its ``.obs`` holds the image modality's obs
    columns prefixed with ``image_key``.

    Examples
    --------
    >>> mdata = mcvi_ops.tl.to_mudata(adata, features)  # doctest: +SKIP
    >>> mdata.mod["features"]  # doctest: +SKIP
    """
    from mudata import MuData

    if image_key == features_key:
        msg = f"`image_key` and `features_key` must differ, both are {image_key!r}."
        raise ValueError(msg)
    for ad, which in ((image_adata, "image_adata"), (features_adata, "features_adata")):
        if not ad.obs_names.is_unique:
            msg = f"{which}.obs_names must be unique; call `{which}.obs_names_make_unique()`."
            raise ValueError(msg)
    a, b = image_adata.obs_names, features_adata.obs_names
    if not a.equals(b):
        only_a, only_b = a.difference(b), b.difference(a)
        if only_a.size or only_b.size:
            msg = (
                f"image_adata and features_adata must hold the same cells: {only_a.size} "
                f"obs_names only in image_adata (e.g. {list(only_a[:3])}), {only_b.size} only in "
                f"features_adata (e.g. {list(only_b[:3])}). Subset both to the shared cells, "
                "e.g. `features_adata[image_adata.obs_names]`."
            )
            raise ValueError(msg)
        if not reorder:
            msg = (
                "image_adata and features_adata hold the same cells in a different order; pass "
                "reorder=True or reorder with `features_adata[image_adata.obs_names]`."
            )
            raise ValueError(msg)
        logger.info("Reordering features_adata to the cell order of image_adata.")
        features_adata = features_adata[a].copy()
    import mudata

    with mudata.set_options(pull_on_update=False):
        mdata = MuData({image_key: image_adata, features_key: features_adata})
        mdata.pull_obs(mods=image_key)
    return mdata
