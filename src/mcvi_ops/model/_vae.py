"""The standard VAE baseline on image crops."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from anndata import AnnData

from mcvi_ops._constants import OBSM
from mcvi_ops.module import ImageVAE

from ._base import BaseImageModel

logger = logging.getLogger(__name__)


class VAE(BaseImageModel):
    """A standard VAE on cell crops: one encoder, one latent with a N(0, I) prior.

    The baseline of the Multi-Contrastive VAE paper; it mixes perturbation effects with natural
    and technical variation. Same API as :class:`~mcvi_ops.MCVAE`.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    n_latent
        Dimension of the latent space.
    **module_kwargs
        More arguments of :class:`~mcvi_ops.module.ImageVAE`.

    Examples
    --------
    >>> import mcvi_ops
    >>> adata = mcvi_ops.datasets.synthetic_screen(n_cells=600, crop_size=32, seed=0)
    >>> mcvi_ops.VAE.setup_anndata(adata, perturbation_key="gene_symbol")
    >>> model = mcvi_ops.VAE(adata)
    >>> model.train(max_epochs=1)
    >>> latent = model.get_latent_representation(add_to_obsm=True)
    >>> adata.obsm["X_vae"].shape
    (600, 64)
    """

    _module_cls = ImageVAE
    _balanced_training = False

    def __init__(
        self, adata: AnnData | None = None, *, n_latent: int = 64, **module_kwargs
    ) -> None:
        super().__init__(adata)
        n_channels, crop_size, _, n_batch = self._image_layout()
        self.module = self._module_cls(
            n_channels, crop_size, n_batch=n_batch, n_latent=n_latent, **module_kwargs
        )
        self._set_dark_level()
        self._fit_input_transform()
        self._model_summary_string = (
            f"VAE: {n_channels} channels, {crop_size[0]}x{crop_size[1]} px crops, "
            f"{n_latent}-d latent, batch covariate: {n_batch > 0}"
        )
        self.init_params_ = self._get_init_params(locals())

    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        batch_size: int | None = None,
        add_to_obsm: bool = False,
        progress_bar: bool | None = None,
        **kwargs,
    ) -> np.ndarray:
        """Posterior means of the latent.

        Parameters
        ----------
        adata
            AnnData with crops of the same channels and size (default: the training data).
        indices
            Rows of ``adata`` to embed (default: all).
        batch_size
            Cells per minibatch (``scvi.settings.batch_size`` by default).
        add_to_obsm
            Also write the result to ``adata.obsm["X_vae"]`` (all rows only).
        progress_bar
            Show a progress bar over the cells; `None`: when there are more than 10 minibatches.
        **kwargs
            More arguments of :meth:`scvi.model.base.VAEMixin.get_latent_representation`.

        Returns
        -------
        Array of shape ``(n_cells, n_latent)``; with ``add_to_obsm=True`` also sets
        ``adata.obsm["X_vae"]``.
        """
        if add_to_obsm and indices is not None:
            msg = (
                "`add_to_obsm=True` embeds every row; drop `indices` or write the result yourself."
            )
            raise ValueError(msg)
        self._check_if_trained(warn=True)
        self.module.eval()
        with self._progress(progress_bar, "Embedding"):
            values = super().get_latent_representation(
                adata, indices, batch_size=batch_size, **kwargs
            )
        if add_to_obsm:
            self._write_obsm(self.adata if adata is None else adata, OBSM.vae, values)
        return values
