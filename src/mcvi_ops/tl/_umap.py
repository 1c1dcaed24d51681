"""UMAPs of several embeddings side by side, each under its own keys (for ``pl.salient_background``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from anndata import AnnData

from mcvi_ops._constants import OBSM

from ._utils import rep_names

logger = logging.getLogger(__name__)

#: scanpy switches from exact neighbours to pynndescent from this many cells on
_APPROXIMATE_FROM = 8192


def umap_key(rep: str) -> str:
    """The ``.obsm`` key of the UMAP of the embedding ``.obsm[rep]``: ``f"X_umap_{rep}"``."""
    return f"X_umap_{rep}"


def neighbors_key(rep: str) -> str:
    """The ``.uns``/``.obsp`` key of the neighbour graph of ``.obsm[rep]``: ``f"neighbors_{rep}"``."""
    return f"neighbors_{rep}"


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


def umaps(
    adata: AnnData,
    *,
    use_rep: str | Sequence[str] = (OBSM.salient, OBSM.background),
    n_neighbors: int = 15,
    seed: int = 0,
    recompute: bool = False,
) -> None:
    """Compute a UMAP of each embedding, stored under its own keys for side-by-side plots.

    :func:`scanpy.pp.neighbors` and :func:`scanpy.tl.umap` of each representation, with the
    neighbour graph and the UMAP named after it, so that ``.uns["neighbors"]`` and
    ``.obsm["X_umap"]`` are never touched and :func:`mcvi_ops.pl.salient_background` finds them.
    From 8,192 cells on, the neighbours are approximate (pynndescent), as in scanpy.

    Parameters
    ----------
    adata
        Cells (or guides/genes) with the embeddings in ``.obsm``.
    use_rep
        Key (or keys) of ``.obsm``.
    n_neighbors
        Passed to :func:`scanpy.pp.neighbors`.
    seed
        Random state of the neighbours and the UMAP.
    recompute
        Compute again even where a UMAP of the representation is stored.

    Returns
    -------
    Nothing; sets, for each representation ``rep``,

    ``adata.uns[f"neighbors_{rep}"]``, ``adata.obsp[f"neighbors_{rep}_distances"]``, ``adata.obsp[f"neighbors_{rep}_connectivities"]``
        The neighbour graph (:func:`scanpy.pp.neighbors` with ``key_added``).
    ``adata.obsm[f"X_umap_{rep}"]``
        The UMAP coordinates (:func:`scanpy.tl.umap` with ``key_added``).

    Examples
    --------
    >>> import numpy as np
    >>> import anndata as ad
    >>> import mcvi_ops
    >>> adata = ad.AnnData(np.zeros((60, 1), dtype=np.float32))
    >>> adata.obsm["X_mcvae_salient"] = np.random.default_rng(0).normal(size=(60, 4))
    >>> mcvi_ops.tl.umaps(adata, use_rep="X_mcvae_salient", n_neighbors=5)
    >>> adata.obsm["X_umap_X_mcvae_salient"].shape
    (60, 2)
    """
    import scanpy as sc

    reps = [rep for rep in rep_names(use_rep) if rep is not None]
    for rep in reps:
        if rep not in adata.obsm:
            msg = (
                f"Did not find .obsm[{rep!r}]; available keys are {list(adata.obsm.keys())}. "
                "Run `model.get_latent_representation(..., add_to_obsm=True)` first."
            )
            raise KeyError(msg)
    for rep in reps:
        if not recompute and umap_key(rep) in adata.obsm:
            continue
        transformer = (
            _approximate_knn(n_neighbors, seed, adata.n_obs)
            if adata.n_obs >= _APPROXIMATE_FROM
            else None
        )
        sc.pp.neighbors(
            adata,
            use_rep=rep,
            n_neighbors=n_neighbors,
            key_added=neighbors_key(rep),
            random_state=seed,
            transformer=transformer,
        )
        sc.tl.umap(
            adata, neighbors_key=neighbors_key(rep), key_added=umap_key(rep), random_state=seed
        )
        logger.info("Stored the UMAP of %r in .obsm[%r].", rep, umap_key(rep))
