"""Side-by-side UMAPs of the salient and background spaces."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from anndata import AnnData

logger = logging.getLogger(__name__)

#: scanpy switches from exact neighbours to pynndescent from this many cells on
_APPROXIMATE_FROM = 8192


def _approximate_knn(n_neighbors: int, seed: int, n_obs: int):
    """Approximate k-NN (pynndescent) for scanpy that returns a ``csr_matrix``.

    scanpy 1.11.5 calls ``getnnz`` on pynndescent's result, a ``csr_array`` that no longer has
    it, so neighbours of more than 8,192 cells fail; a ``csr_matrix`` has it.
    """
    import scipy.sparse
    from pynndescent import PyNNDescentTransformer
    from sklearn.base import BaseEstimator, TransformerMixin

    class CsrMatrixNNDescent(TransformerMixin, BaseEstimator):
        def __init__(self, n_neighbors: int = 15, random_state: int = 0) -> None:
            self.n_neighbors = n_neighbors
            self.random_state = random_state

        def fit_transform(self, X, y=None):
            # UMAP's defaults for the index size, as scanpy uses them
            inner = PyNNDescentTransformer(
                n_neighbors=self.n_neighbors,
                random_state=self.random_state,
                n_trees=min(64, 5 + round(n_obs**0.5 / 20.0)),
                n_iters=max(5, round(np.log2(n_obs))),
            )
            return scipy.sparse.csr_matrix(inner.fit_transform(X))

    return CsrMatrixNNDescent(n_neighbors=n_neighbors, random_state=seed)


def salient_background(
    adata: AnnData,
    *,
    color: str | None = None,
    reps: Sequence[str] = ("X_mcvae_salient", "X_mcvae_background"),
    n_neighbors: int = 15,
    recompute: bool = False,
    seed: int = 0,
    axs=None,
    show: bool = False,
    **kwargs,
):
    """UMAPs of several embeddings (by default salient and background) side by side.

    For each representation ``rep`` the neighbour graph is stored under ``f"neighbors_{rep}"`` and
    the UMAP under ``.obsm[f"X_umap_{rep}"]``; existing results are reused unless ``recompute``.
    ``.obsm["X_umap"]`` and ``.uns["neighbors"]`` are never touched.

    Parameters
    ----------
    adata
        Cells (or guides/genes) with the embeddings in ``.obsm``.
    color
        Obs column or variable to colour by (passed to :func:`scanpy.pl.embedding`).
    reps
        Keys of ``.obsm``, one panel each.
    n_neighbors
        Passed to :func:`scanpy.pp.neighbors`.
    recompute
        Recompute neighbours and UMAP even if stored.
    seed
        Random state of neighbours and UMAP.
    axs
        Sequence of axes, one per representation; a new figure if `None`.
    show
        Call :func:`matplotlib.pyplot.show`.
    **kwargs
        Passed to :func:`scanpy.pl.embedding`.

    Returns
    -------
    List of the matplotlib Axes, one per representation.

    Examples
    --------
    >>> axs = mcvi_ops.pl.salient_background(adata, color="gene_symbol")  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt
    import scanpy as sc

    reps = list(reps)
    for rep in reps:
        if rep not in adata.obsm:
            msg = (
                f"Did not find .obsm[{rep!r}]; available keys are {list(adata.obsm.keys())}. "
                "Run `model.get_latent_representation(...)` first."
            )
            raise KeyError(msg)
    if axs is None:
        _, axs = plt.subplots(1, len(reps), figsize=(4 * len(reps), 4), squeeze=False)
        axs = list(axs.ravel())
    axs = list(axs)
    if len(axs) != len(reps):
        msg = f"Got {len(axs)} axes for {len(reps)} representations; pass one axis per rep."
        raise ValueError(msg)
    for rep, ax in zip(reps, axs, strict=True):
        umap_key = f"X_umap_{rep}"
        if recompute or umap_key not in adata.obsm:
            neighbors_key = f"neighbors_{rep}"
            transformer = (
                _approximate_knn(n_neighbors, seed, adata.n_obs)
                if adata.n_obs >= _APPROXIMATE_FROM
                else None
            )
            sc.pp.neighbors(
                adata,
                use_rep=rep,
                n_neighbors=n_neighbors,
                key_added=neighbors_key,
                random_state=seed,
                transformer=transformer,
            )
            sc.tl.umap(adata, neighbors_key=neighbors_key, key_added=umap_key, random_state=seed)
            logger.info("Stored the UMAP of %r in .obsm[%r].", rep, umap_key)
        sc.pl.embedding(adata, basis=umap_key, color=color, ax=ax, show=False, title=rep, **kwargs)
    if show:
        plt.show()
    return axs
