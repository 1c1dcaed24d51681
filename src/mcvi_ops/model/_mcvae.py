"""The Multi-Contrastive VAE model: AnnData in, arrays and DataFrames out."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS

from mcvi_ops._constants import CONTROL_CODE, OBSM, PERTURBATION_KEY
from mcvi_ops.module import MultiContrastiveVAE

from ._base import BaseImageModel
from ._distributed import outputs_on_devices
from ._health import latent_activity, record_training_health
from ._objective import Objective, objective_settings

logger = logging.getLogger(__name__)

LatentKind = Literal["salient", "background", "both"]
_OBSM_KEYS = {"salient": OBSM.salient, "background": OBSM.background, "both": OBSM.both}


def _posterior_means(module: MultiContrastiveVAE, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Posterior means ``s`` then ``z`` of a minibatch (for embedding on several devices)."""
    out = module.inference(**module._get_inference_input(tensors))
    return torch.cat([out["qs"].loc, out["qz"].loc], dim=1)


class MCVAE(BaseImageModel):
    """Multi-Contrastive VAE for optical pooled screens (Wang, Lopez, ..., Regev, 2024).

    Two convolutional encoders split each cell crop into a *background* latent ``z`` (variation
    control cells show too: cell cycle, size, technical artefacts) and a *salient* latent ``s``
    (variation only perturbations cause). Each perturbation has learned prior means for ``z``
    and ``s``; control cells are decoded with ``s = 0`` and their ``q(s | x)`` is pulled to 0.

    By default (``objective="weakly_supervised"``) two linear read-outs, one of ``s`` and one
    of ``z``, learn each cell's perturbation from its posterior means: weak supervision with the
    labels every screen has, without which the latents learn little that tells perturbations
    apart (``benchmarks/results/calibration.md``). ``objective="paper"`` trains the paper's
    objective without them. After training, :meth:`get_latent_activity` reports how alive each
    latent is (also in ``model.history["latent_activity"]``) and a warning says when the
    salient latent has collapsed.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    n_salient_latent
        Dimension of the salient latent ``s``.
    n_background_latent
        Dimension of the background latent ``z``.
    prior
        Which latents get learned per-perturbation prior means: ``"both"`` (the mcVAE),
        ``"salient"``, ``"background"``, or ``"none"`` (the contrastive VAE, cVAE).
    objective
        ``"weakly_supervised"`` (penalty 8, read-outs of ``s`` and ``z`` with weight 10,000) or
        ``"paper"`` (penalty 8, no read-out). Explicit arguments below override it.
    wasserstein_penalty
        Weight of the penalty ``||mu_s||^2 + sum(sigma_s^2)`` on control cells (default: the
        objective's).
    classification_weight
        Weight of the cross-entropy of the perturbation read-outs (0: none; default: the
        objective's). It competes with a reconstruction term summed over every pixel.
    classifier_input
        ``"salient"``: one read-out, of ``s``; ``"both"``: also a separate one of ``z``
        (default: the objective's).
    **module_kwargs
        More arguments of :class:`~mcvi_ops.module.MultiContrastiveVAE` (filters, likelihood
        scale, arcsinh cofactor, custom encoder/decoder networks).

    Examples
    --------
    >>> import mcvi_ops
    >>> adata = mcvi_ops.datasets.synthetic_screen(n_cells=2_000, seed=0)
    >>> mcvi_ops.MCVAE.setup_anndata(
    ...     adata, perturbation_key="gene_symbol", control_category="nontargeting"
    ... )
    >>> model = mcvi_ops.MCVAE(adata)
    >>> model.train(max_epochs=1)
    >>> salient = model.get_latent_representation(kind="salient", add_to_obsm=True)
    >>> adata.obsm["X_mcvae_salient"].shape
    (2000, 32)
    """

    _module_cls = MultiContrastiveVAE

    def __init__(
        self,
        adata: AnnData | None = None,
        *,
        n_salient_latent: int = 32,
        n_background_latent: int = 32,
        prior: Literal["both", "salient", "background", "none"] = "both",
        objective: Objective = "weakly_supervised",
        wasserstein_penalty: float | None = None,
        classification_weight: float | None = None,
        classifier_input: Literal["salient", "both"] | None = None,
        **module_kwargs,
    ) -> None:
        super().__init__(adata)
        settings = objective_settings(
            "MCVAE",
            objective,
            wasserstein_penalty=wasserstein_penalty,
            classification_weight=classification_weight,
            classifier_input=classifier_input,
        )
        n_channels, crop_size, n_perturbations, n_batch = self._image_layout()
        self.module = self._module_cls(
            n_channels,
            crop_size,
            n_perturbations,
            n_batch=n_batch,
            n_salient_latent=n_salient_latent,
            n_background_latent=n_background_latent,
            prior=prior,
            **settings,
            **module_kwargs,
        )
        self._set_dark_level()
        self._fit_input_transform()
        name = {"both": "mcVAE", "none": "cVAE"}.get(prior, f"mcVAE (prior on {prior} only)")
        self._model_summary_string = (
            f"{name}: {n_channels} channels, {crop_size[0]}x{crop_size[1]} px crops, "
            f"{n_perturbations - 1} perturbations + control, salient {n_salient_latent}-d, "
            f"background {n_background_latent}-d, batch covariate: {n_batch > 0}, objective: "
            f"{objective}"
        )
        self.init_params_ = self._get_init_params(locals())

    # --- outputs --------------------------------------------------------------------------
    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        kind: LatentKind = "both",
        batch_size: int | None = None,
        add_to_obsm: bool = False,
        progress_bar: bool | None = None,
        devices: int | list[int] | str | None = None,
        accelerator: str = "auto",
        strategy: str | None = None,
    ) -> np.ndarray:
        """Posterior means of the salient and/or background latents.

        .. long function: documentation and signature; the body is under 80 lines.

        Parameters
        ----------
        adata
            AnnData with crops of the same channels and size (default: the training data).
        indices
            Rows of ``adata`` to embed (default: all).
        kind
            ``"salient"`` (``s``), ``"background"`` (``z``) or ``"both"`` (``s`` then ``z``).
        batch_size
            Cells per minibatch.
        add_to_obsm
            Also write the result to ``adata.obsm`` (all rows only). With ``kind="both"`` the
            salient and background parts are written too, so one call stores all three.
        progress_bar
            Show a progress bar over the cells; `None`: when there are more than 10 minibatches.
        devices
            `None`: embed in this process, on the model's device. Otherwise embed with Lightning
            on these devices of ``accelerator`` (e.g. ``devices=4, strategy="ddp"``): each rank
            embeds a contiguous, chunk-aligned shard of the cells and every rank returns all
            rows in order. Run it from a script, as training with ``strategy="ddp"`` (Lightning
            starts the script again for the other ranks).
        accelerator
            Lightning accelerator when ``devices`` is given (``"auto"``, ``"gpu"``, ``"cpu"``).
        strategy
            Lightning strategy when ``devices`` is given; `None`: Lightning's choice (``"ddp"``
            for several devices).

        Returns
        -------
        Array of shape ``(n_cells, n_latent)``. With ``add_to_obsm=True`` also sets

        ``adata.obsm["X_mcvae_salient"]``
            ``s`` (``kind="salient"`` or ``"both"``).
        ``adata.obsm["X_mcvae_background"]``
            ``z`` (``kind="background"`` or ``"both"``).
        ``adata.obsm["X_mcvae"]``
            ``s`` then ``z`` (``kind="both"``).
        """
        if kind not in _OBSM_KEYS:
            msg = f"`kind` must be 'salient', 'background' or 'both', got {kind!r}."
            raise ValueError(msg)
        if add_to_obsm and indices is not None:
            msg = (
                "`add_to_obsm=True` embeds every row; drop `indices` or write the result yourself."
            )
            raise ValueError(msg)
        self.module.eval()
        if devices is not None:  # several devices: see model/_distributed.py
            both = outputs_on_devices(
                self,
                adata,
                indices,
                _posterior_means,
                batch_size=batch_size,
                accelerator=accelerator,
                devices=devices,
                strategy=strategy,
                progress_bar=progress_bar,
            )
        else:
            loader = self._iterate(adata, indices, batch_size, progress_bar=progress_bar)
            both = self._stack_rows(loader, partial(_posterior_means, self.module))
        n_salient = self.module.n_salient_latent
        parts = {"salient": both[:, :n_salient], "background": both[:, n_salient:], "both": both}
        latent = np.ascontiguousarray(parts[kind])
        if add_to_obsm:
            target = self.adata if adata is None else adata
            for written in ("salient", "background", "both") if kind == "both" else (kind,):
                self._write_obsm(target, _OBSM_KEYS[written], np.ascontiguousarray(parts[written]))
        return latent

    def get_latent_activity(
        self, adata: AnnData | None = None, *, n_cells: int = 2_000, seed: int = 0
    ) -> pd.DataFrame:
        """How alive the salient and background latents are on perturbed cells.

        A contrastive model whose salient latent has *collapsed* (every cell encoded at about the
        same ``s``) keeps every perturbation effect in the background latent, and the split into
        salient and background does not work. :meth:`train` computes this table at its end,
        stores it in ``model.history["latent_activity"]`` and warns when the salient latent has
        collapsed.

        Parameters
        ----------
        adata
            AnnData set up like the training data (default: the training data).
        n_cells
            Most perturbed cells to embed (a random sample).
        seed
            Seed of the sample.

        Returns
        -------
        DataFrame indexed by ``"salient"`` and ``"background"`` with the columns ``n_dims``,
        ``active_dims`` (dimensions whose posterior mean varies across perturbed cells with
        variance above 0.01), ``mean_variance``, ``variance_ratio`` (to the background's) and
        ``collapsed`` (salient: ratio below 0.05 or no active dimension).

        Examples
        --------
        >>> model.get_latent_activity()  # doctest: +SKIP
                    n_dims  active_dims  mean_variance  variance_ratio  collapsed
        latent
        salient         32           30           0.61            0.35      False
        background      32           32           1.74            1.00      False
        """
        adata = self._validate_anndata(adata)
        manager = self.get_anndata_manager(adata, required=True)
        codes = np.asarray(manager.get_from_registry(PERTURBATION_KEY)).reshape(-1)
        perturbed = np.flatnonzero(codes != CONTROL_CODE)
        if len(perturbed) == 0:
            msg = "No perturbed cells to measure the latents on; pass an AnnData that has some."
            raise ValueError(msg)
        if len(perturbed) > n_cells:
            rng = np.random.default_rng(seed)
            perturbed = np.sort(rng.choice(perturbed, n_cells, replace=False))
        both = self.get_latent_representation(adata, perturbed, kind="both", progress_bar=False)
        n_salient = self.module.n_salient_latent
        return latent_activity(both[:, :n_salient], both[:, n_salient:])

    def _embed_for_health(self, rows: np.ndarray) -> np.ndarray:
        return self.get_latent_representation(indices=rows, kind="both", progress_bar=False)

    def _after_training(self) -> None:
        manager = self.get_anndata_manager(self.adata, required=True)
        module = self.module
        record_training_health(
            self,
            np.asarray(manager.get_from_registry(PERTURBATION_KEY)).reshape(-1),
            control_code=CONTROL_CODE,
            hint=(
                f"Lower `wasserstein_penalty` (now {module.wasserstein_penalty:g}) or raise "
                f"`classification_weight` (now {module.classification_weight:g}) in MCVAE(...), "
                "or train longer."
            ),
        )

    def get_perturbation_priors(self) -> pd.DataFrame:
        """The learned prior means of each perturbation.

        Returns
        -------
        DataFrame indexed by perturbation (control first) with columns ``background_0..`` and
        ``salient_0..``. Latents without a learned prior (``prior`` option) are all 0; the control's
        background mean is fixed at 0 and its salient latent is 0 by construction.
        """
        categories = self.adata_manager.get_state_registry(PERTURBATION_KEY).categorical_mapping
        codes = torch.arange(len(categories), device=self.module.device)
        with torch.inference_mode():
            mean_z, mean_s = self.module.prior_means(codes)
        columns = [f"background_{i}" for i in range(mean_z.shape[1])]
        columns += [f"salient_{i}" for i in range(mean_s.shape[1])]
        values = torch.cat([mean_z, mean_s], dim=1).float().cpu().numpy()
        frame = pd.DataFrame(values, index=pd.Index(list(categories), name="perturbation"))
        frame.columns = columns
        return frame

    @torch.inference_mode()
    def decode(
        self,
        background: np.ndarray,
        salient: np.ndarray,
        *,
        batch: Sequence[str] | None = None,
        inverse_transform: bool = False,
    ) -> np.ndarray:
        """Decode latent codes to images.

        Parameters
        ----------
        background
            Background codes ``z``, shape (n, n_background_latent).
        salient
            Salient codes ``s``, shape (n, n_salient_latent); zeros decode as a control cell.
        batch
            Batch category of each code (needed when set up with ``batch_key``).
        inverse_transform
            Return raw-intensity images instead of the model's [-1, 1] scale.

        Returns
        -------
        Images of shape (n, n_channels, height, width).
        """
        z = torch.as_tensor(np.asarray(background), dtype=torch.float32, device=self.module.device)
        s = torch.as_tensor(np.asarray(salient), dtype=torch.float32, device=self.module.device)
        if z.ndim != 2 or s.ndim != 2 or len(z) != len(s):
            msg = (
                f"`background` and `salient` must be 2-D with the same number of rows, got shapes "
                f"{tuple(z.shape)} and {tuple(s.shape)}."
            )
            raise ValueError(msg)
        if (
            z.shape[1] != self.module.n_background_latent
            or s.shape[1] != self.module.n_salient_latent
        ):
            msg = (
                f"Expected {self.module.n_background_latent} background and "
                f"{self.module.n_salient_latent} salient dimensions, got {z.shape[1]} and {s.shape[1]}."
            )
            raise ValueError(msg)
        self.module.eval()
        batch_index = self._batch_codes(batch, len(z))
        images = self.module.generative(z, s, batch_index)["px_mean"]
        return self._to_images(images, inverse_transform)

    def decode_priors(
        self,
        perturbations: Sequence[str] | None = None,
        *,
        batch: str | None = None,
        inverse_transform: bool = False,
    ) -> np.ndarray:
        """Images decoded from perturbations' prior means: what each prior 'looks like'.

        Parameters
        ----------
        perturbations
            Perturbation categories (default: all, control first).
        batch
            Batch category to decode with (needed when set up with ``batch_key``).
        inverse_transform
            Return raw-intensity images instead of the model's [-1, 1] scale.

        Returns
        -------
        Images of shape (n_perturbations, n_channels, height, width).
        """
        priors = self.get_perturbation_priors()
        if perturbations is not None:
            missing = [p for p in perturbations if p not in priors.index]
            if missing:
                msg = f"Perturbations {missing[:5]} are not among the model's categories."
                raise KeyError(msg)
            priors = priors.loc[list(perturbations)]
        background = priors.filter(like="background_").to_numpy()
        salient = priors.filter(like="salient_").to_numpy()
        batches = None if batch is None else [batch] * len(priors)
        return self.decode(background, salient, batch=batches, inverse_transform=inverse_transform)

    def _batch_codes(self, batch: Sequence[str] | None, n: int) -> torch.Tensor | None:
        if self.module.n_batch == 0:
            return None
        if batch is None:
            msg = "The model was set up with `batch_key`; pass `batch=` with one category per code."
            raise ValueError(msg)
        mapping = list(
            self.adata_manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY).categorical_mapping
        )
        unknown = [b for b in batch if b not in mapping]
        if unknown or len(batch) != n:
            msg = (
                f"`batch` must list {n} categories out of {mapping[:5]}..., got {len(batch)} "
                f"values{f' including unknown {unknown[:3]}' if unknown else ''}."
            )
            raise ValueError(msg)
        codes = [mapping.index(b) for b in batch]
        return torch.as_tensor(codes, device=self.module.device).unsqueeze(-1)
