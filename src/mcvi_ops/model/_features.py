"""The Multi-Contrastive VAE on per-cell feature tables: AnnData in, arrays out."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import NumericalJointObsField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin, VAEMixin
from scvi.utils import setup_anndata_dsp

from mcvi_ops._constants import CONTROL_CODE, OBSM, PERTURBATION_KEY
from mcvi_ops.data._feature_field import FeatureField
from mcvi_ops.data._label_fields import UNKNOWN_CODE, BatchField, PerturbationField
from mcvi_ops.dataloaders._features import FeatureDataLoader, FeatureDataSplitter
from mcvi_ops.module import FeatureMultiContrastiveVAE
from mcvi_ops.train import DivergenceGuard, ImageTrainingPlan, ImageTrainRunner

from ._feature_stats import control_statistics, covariate_trend
from ._health import latent_activity, record_training_health
from ._objective import Objective, objective_settings
from ._persistence import SafeSaveLoadMixin
from ._save_load import LOADING

logger = logging.getLogger(__name__)

LatentKind = Literal["salient", "background", "both"]
_OBSM_KEYS = {
    "salient": OBSM.features_salient,
    "background": OBSM.features_background,
    "both": OBSM.features_both,
}
#: cells seen (summed over epochs) that the default number of epochs aims for
_TARGET_CELLS_SEEN = 300_000


def default_feature_epochs(n_cells: int) -> int:
    """Default epochs of :class:`~mcvi_ops.FeatureMCVAE`: ``ceil(300,000 / n_cells)`` between 5 and 100.

    Examples
    --------
    >>> default_feature_epochs(10_000)
    30
    """
    return int(np.clip(math.ceil(_TARGET_CELLS_SEEN / max(n_cells, 1)), 5, 100))


class FeatureMCVAE(SafeSaveLoadMixin, VAEMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """Multi-Contrastive VAE on per-cell feature tables (CellProfiler, cp_measure, brieflow).

    The objective of :class:`~mcvi_ops.MCVAE` on a cells x features AnnData instead of crops: two
    fully connected encoders give the background latent ``z`` and the salient latent ``s``;
    control cells are decoded with ``s = 0``; each perturbation has learned prior means; a linear
    read-out of the perturbation from ``s`` gives weak supervision. The model standardises the
    raw features itself against the control cells of each batch (median and scaled median
    absolute deviation, with fallbacks; see ``mcvi_ops.model._feature_stats``), sets NaN and
    infinite values to the controls' centre, clips to ``[-clip, clip]`` and leaves out features
    without spread among the controls. The statistics are saved with the model, so cells to
    embed later are transformed the same way; cells of batches the model never saw are
    standardised against their own batch's controls.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    n_salient_latent
        Dimension of the salient latent ``s``.
    n_background_latent
        Dimension of the background latent ``z``.
    prior
        Which latents get learned per-perturbation prior means (as in :class:`~mcvi_ops.MCVAE`).
    objective
        ``"weakly_supervised"`` (penalty 8, read-out of ``s`` with weight 100) or ``"paper"``
        (penalty 8, no read-out). Explicit arguments below override it.
    wasserstein_penalty
        Weight of the penalty ``||mu_s||^2 + sum(sigma_s^2)`` on control cells (default: the
        objective's).
    classification_weight
        Weight of the cross-entropy of a linear read-out of each cell's perturbation from ``s``
        (0: none; default: the objective's).
    clip
        Standardised features are clipped to ``[-clip, clip]``.
    **module_kwargs
        More arguments of :class:`~mcvi_ops.module.FeatureMultiContrastiveVAE` (widths, layers,
        dropout, likelihood scale, custom networks).

    Examples
    --------
    >>> import mcvi_ops
    >>> adata = mcvi_ops.datasets.synthetic_screen(n_cells=2_000, seed=0)
    >>> features = mcvi_ops.tl.cellprofiler_features(adata)  # doctest: +SKIP
    >>> mcvi_ops.FeatureMCVAE.setup_anndata(
    ...     features, perturbation_key="gene_symbol", batch_key="well"
    ... )  # doctest: +SKIP
    >>> model = mcvi_ops.FeatureMCVAE(features)  # doctest: +SKIP
    >>> model.train()  # doctest: +SKIP
    >>> model.get_latent_representation(kind="both", add_to_obsm=True)  # doctest: +SKIP
    """

    _module_cls = FeatureMultiContrastiveVAE
    _data_splitter_cls = FeatureDataSplitter
    _training_plan_cls = ImageTrainingPlan
    _train_runner_cls = ImageTrainRunner
    _data_loader_cls = FeatureDataLoader
    _required_field = REGISTRY_KEYS.X_KEY
    _data_hint = "the AnnData of features the model was trained on (or one with the same set-up)"

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
        clip: float = 10.0,
        **module_kwargs,
    ) -> None:
        if adata is None:
            msg = (
                "FeatureMCVAE needs the AnnData of the cells, set up with "
                "`mcvi_ops.FeatureMCVAE.setup_anndata(adata, perturbation_key=...)`."
            )
            raise ValueError(msg)
        super().__init__(adata)
        stats = self.summary_stats
        n_batch = int(stats.get("n_batch", 0)) if self._has(REGISTRY_KEYS.BATCH_KEY) else 0
        n_continuous = (
            int(stats.get("n_extra_continuous_covs", 0))
            if self._has(REGISTRY_KEYS.CONT_COVS_KEY)
            else 0
        )
        self.module = self._module_cls(
            int(stats["n_vars"]),
            int(stats["n_perturbation"]),
            n_batch=n_batch,
            n_continuous_covariates=n_continuous,
            n_salient_latent=n_salient_latent,
            n_background_latent=n_background_latent,
            prior=prior,
            clip=clip,
            **objective_settings(
                "FeatureMCVAE",
                objective,
                wasserstein_penalty=wasserstein_penalty,
                classification_weight=classification_weight,
            ),
            **module_kwargs,
        )
        self._fit_standardization()
        self._model_summary_string = (
            f"FeatureMCVAE: {int(stats['n_vars'])} features, "
            f"{int(stats['n_perturbation']) - 1} perturbations + control, salient "
            f"{n_salient_latent}-d, background {n_background_latent}-d, batches: {n_batch}, "
            f"continuous covariates: {n_continuous}"
        )
        self.init_params_ = self._get_init_params(locals())

    # --- set-up ---------------------------------------------------------------------------
    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        perturbation_key: str = "gene_symbol",
        control_category: str = "nontargeting",
        *,
        batch_key: str | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        """Register the features, the perturbations, an optional batch and covariates.

        Parameters
        ----------
        adata
            Cells x features, e.g. from :func:`~mcvi_ops.tl.cellprofiler_features`, brieflow's
            feature tables or a pycytominer-style table (metadata in ``.obs``).
        layer
            Layer holding the raw features; `None` uses ``.X``.
        perturbation_key
            Column of ``adata.obs`` naming each cell's perturbation.
        control_category
            The category of control cells.
        batch_key
            Optional column of the technical batch (e.g. plate and well): features are
            standardised against the controls of each batch, and the decoder reads it.
        continuous_covariate_keys
            Optional columns of continuous technical covariates fed to the decoder (e.g. the
            distance of each cell from the centre of its field of view).
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        fields = [
            FeatureField(REGISTRY_KEYS.X_KEY, layer),
            PerturbationField(
                PERTURBATION_KEY, perturbation_key, control_category=control_category
            ),
        ]
        if batch_key is not None:
            fields.append(BatchField(REGISTRY_KEYS.BATCH_KEY, batch_key))
        if continuous_covariate_keys:
            missing = [k for k in continuous_covariate_keys if k not in adata.obs]
            if missing:
                msg = (
                    f"Covariate columns {missing} not found in adata.obs (columns: "
                    f"{list(adata.obs.columns)[:15]}). Pass existing numeric columns as "
                    "`continuous_covariate_keys=`."
                )
                raise KeyError(msg)
            fields.append(
                NumericalJointObsField(REGISTRY_KEYS.CONT_COVS_KEY, list(continuous_covariate_keys))
            )
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    def _has(self, key: str, manager: AnnDataManager | None = None) -> bool:
        return key in (manager or self.adata_manager).data_registry

    def _codes(self, key: str, manager: AnnDataManager | None = None) -> np.ndarray:
        return np.asarray((manager or self.adata_manager).get_from_registry(key)).reshape(-1)

    def _fit_standardization(self) -> None:
        """Per-batch control statistics of the training cells, into the module's buffers."""
        if LOADING.get():
            return  # the saved statistics are loaded next
        manager = self.adata_manager
        batch = self._codes(REGISTRY_KEYS.BATCH_KEY) if self._has(REGISTRY_KEYS.BATCH_KEY) else None
        names = (
            list(manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY).categorical_mapping)
            if batch is not None
            else None
        )
        matrix = manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        control = self._codes(PERTURBATION_KEY) == CONTROL_CODE
        stats = control_statistics(
            matrix,
            control,
            batch,
            self.module.n_batch,
            feature_names=list(self.adata.var_names),
            batch_names=names,
        )
        trend = variance = None
        if self.module.n_continuous_covariates:
            covariates = np.asarray(manager.get_from_registry(REGISTRY_KEYS.CONT_COVS_KEY))
            trend, variance = covariate_trend(
                matrix, control, batch, stats, covariates, clip=self.module.clip
            )
        self.module.set_standardization(stats.center, stats.scale, stats.kept, trend, variance)

    # --- training -------------------------------------------------------------------------
    def train(
        self,
        max_epochs: int | None = None,
        *,
        batch_size: int = 256,
        lr: float = 1e-3,
        early_stopping: bool = True,
        train_size: float = 0.9,
        validation_size: float | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        datasplitter_kwargs: dict | None = None,
        plan_kwargs: dict | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        """Train on minibatches with equally many control and perturbed cells.

        .. long function: documentation and signature; the body is under 80 lines.

        Parameters
        ----------
        max_epochs
            Passes over the perturbed cells. Default:
            :func:`~mcvi_ops.model.default_feature_epochs` of the number of cells.
        batch_size
            Cells per minibatch, half controls and half perturbed cells (even).
        lr
            Adam learning rate.
        early_stopping
            Stop when the validation loss has not improved for 10 epochs.
        train_size, validation_size
            Fractions of cells (controls and perturbed alike) for training and validation.
        accelerator, devices
            Lightning accelerator and devices (``strategy="ddp"`` shards the batches).
        datasplitter_kwargs
            More arguments of :class:`~mcvi_ops.dataloaders.FeatureDataSplitter`.
        plan_kwargs
            More arguments of :class:`scvi.train.TrainingPlan` (e.g. ``n_epochs_kl_warmup``).
        **trainer_kwargs
            More arguments of :class:`scvi.train.Trainer`.

        Returns
        -------
        Nothing; training curves are in ``model.history`` and the latent activity in
        ``model.history["latent_activity"]``.
        """
        if isinstance(batch_size, bool) or batch_size < 2 or batch_size % 2:
            msg = (
                f"`batch_size` must be an even number >= 2 (half controls, half perturbed cells), "
                f"got {batch_size!r}."
            )
            raise ValueError(msg)
        max_epochs = default_feature_epochs(self.adata.n_obs) if max_epochs is None else max_epochs
        if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1:
            msg = f"`max_epochs` must be a positive integer or None, got {max_epochs!r}."
            raise ValueError(msg)
        plan = {
            "lr": lr,
            # standard Adam: scvi-tools' eps=0.01 stalls parameters with small gradients
            "eps": 1e-8,
            "weight_decay": 0.0,
            "n_epochs_kl_warmup": max(1, max_epochs // 3),
            **(plan_kwargs or {}),
        }
        callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
        callbacks.append(DivergenceGuard(100.0))
        if train_size < 1.0:
            trainer_kwargs.setdefault("early_stopping_monitor", "validation_loss")
            trainer_kwargs.setdefault("early_stopping_patience", 10)
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        else:
            early_stopping = False
            trainer_kwargs["limit_val_batches"] = 0
        trainer_kwargs.setdefault("use_distributed_sampler", False)
        trainer_kwargs.setdefault("gradient_clip_val", 10.0)
        super().train(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            train_size=train_size,
            validation_size=validation_size,
            batch_size=batch_size,
            early_stopping=early_stopping,
            datasplitter_kwargs=datasplitter_kwargs,
            plan_kwargs=plan,
            callbacks=callbacks,
            **trainer_kwargs,
        )
        record_training_health(
            self,
            self._codes(PERTURBATION_KEY),
            control_code=CONTROL_CODE,
            hint=(
                f"Lower `wasserstein_penalty` (now {self.module.wasserstein_penalty:g}) or raise "
                f"`classification_weight` (now {self.module.classification_weight:g}) in "
                "FeatureMCVAE(...)."
            ),
        )

    def _embed_for_health(self, rows: np.ndarray) -> np.ndarray:
        return self.get_latent_representation(indices=rows, kind="both")

    # --- outputs --------------------------------------------------------------------------
    def _query_statistics(self, adata: AnnData, manager: AnnDataManager):
        """Standardisation rows for cells of batches the model never saw (their own controls)."""
        if not self._has(REGISTRY_KEYS.BATCH_KEY, manager):
            return None
        codes = self._codes(REGISTRY_KEYS.BATCH_KEY, manager)
        unknown = codes == UNKNOWN_CODE
        if not unknown.any():
            return None
        key = manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY).original_key
        if key not in adata.obs or adata.obs[key][unknown].isna().any():
            msg = (
                f"{int(unknown.sum())} cells have no batch in adata.obs[{key!r}]; features are "
                "standardised against the controls of each batch, so every cell needs one. Fill "
                "the column in (the plate and well of each cell)."
            )
            raise ValueError(msg)
        groups, names = pd.factorize(adata.obs[key].astype(str).to_numpy()[unknown])
        perturbation = self._codes(PERTURBATION_KEY, manager)[unknown]
        stats = control_statistics(
            _Rows(manager.get_from_registry(REGISTRY_KEYS.X_KEY), np.flatnonzero(unknown)),
            perturbation == CONTROL_CODE,
            groups,
            len(names),
            feature_names=[str(v) for v in adata.var_names],
            batch_names=[f"{n} (not in the training data)" for n in names],
        )
        logger.info(
            "%d cells of %d batches the model never saw (e.g. %s) are standardised against "
            "their own batch's controls.",
            int(unknown.sum()),
            len(names),
            list(names[:3]),
        )
        row_of = np.full(len(codes), -1, dtype=np.int64)
        row_of[unknown] = groups
        return row_of, torch.as_tensor(stats.center), torch.as_tensor(stats.scale)

    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        kind: LatentKind = "both",
        batch_size: int | None = None,
        add_to_obsm: bool = False,
    ) -> np.ndarray:
        """Posterior means of the salient and/or background latents.

        Parameters
        ----------
        adata
            AnnData with the model's features (default: the training data).
        indices
            Rows of ``adata`` to embed (default: all).
        kind
            ``"salient"`` (``s``), ``"background"`` (``z``) or ``"both"`` (``s`` then ``z``).
        batch_size
            Cells per minibatch.
        add_to_obsm
            Also write the result to ``adata.obsm`` (all rows only); ``kind="both"`` writes
            the three.

        Returns
        -------
        Array of shape ``(n_cells, n_latent)``. With ``add_to_obsm=True`` also sets

        ``adata.obsm["X_fmcvae_salient"]``
            ``s`` (``kind="salient"`` or ``"both"``).
        ``adata.obsm["X_fmcvae_background"]``
            ``z`` (``kind="background"`` or ``"both"``).
        ``adata.obsm["X_fmcvae"]``
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
        self._check_if_trained(warn=True)
        adata = self._validate_anndata(adata)
        manager = self.get_anndata_manager(adata, required=True)
        rows = np.arange(adata.n_obs) if indices is None else np.asarray(indices).reshape(-1)
        query = self._query_statistics(adata, manager)
        loader = self._make_data_loader(adata=adata, indices=rows, batch_size=batch_size)
        self.module.eval()
        out = np.empty(
            (len(rows), self.module.n_salient_latent + self.module.n_background_latent),
            dtype=np.float32,
        )
        start = 0
        device = self.module.device
        for tensors in loader:
            inputs = self.module._get_inference_input(tensors)
            n = len(inputs["x"])
            if query is not None:
                inputs.update(self._query_rows(query, rows[start : start + n], inputs, device))
            posterior = self.module.inference(**inputs)
            both = torch.cat([posterior["qs"].loc, posterior["qz"].loc], dim=1)
            out[start : start + n] = both.float().cpu().numpy()
            start += n
        n_salient = self.module.n_salient_latent
        parts = {"salient": out[:, :n_salient], "background": out[:, n_salient:], "both": out}
        if add_to_obsm:
            for written in ("salient", "background", "both") if kind == "both" else (kind,):
                adata.obsm[_OBSM_KEYS[written]] = np.ascontiguousarray(parts[written])
                logger.info("Wrote adata.obsm[%r]", _OBSM_KEYS[written])
        return np.ascontiguousarray(parts[kind])

    def _query_rows(self, query, rows: np.ndarray, inputs: dict, device) -> dict:
        """Per-cell centre and scale of a minibatch with cells of unknown batches."""
        row_of, center, scale = query
        batch_index = inputs.get("batch_index")
        known = (
            torch.zeros(len(rows), dtype=torch.long)
            if batch_index is None
            else batch_index.reshape(-1).long().cpu().clamp(min=0)
        )
        cell_center = self.module.feature_center.cpu()[known]
        cell_scale = self.module.feature_scale.cpu()[known]
        unknown = row_of[rows] >= 0
        if unknown.any():
            cell_center[unknown] = center[row_of[rows][unknown]]
            cell_scale[unknown] = scale[row_of[rows][unknown]]
        return {"center": cell_center.to(device), "scale": cell_scale.to(device)}

    def get_latent_activity(
        self, adata: AnnData | None = None, *, n_cells: int = 5_000, seed: int = 0
    ) -> pd.DataFrame:
        """How alive the salient and background latents are on perturbed cells.

        See :meth:`mcvi_ops.MCVAE.get_latent_activity`; the same table.
        """
        adata = self._validate_anndata(adata)
        manager = self.get_anndata_manager(adata, required=True)
        perturbed = np.flatnonzero(
            (self._codes(PERTURBATION_KEY, manager) != CONTROL_CODE)
            & (self._codes(PERTURBATION_KEY, manager) != UNKNOWN_CODE)
        )
        if len(perturbed) == 0:
            msg = "No perturbed cells to measure the latents on; pass an AnnData that has some."
            raise ValueError(msg)
        if len(perturbed) > n_cells:
            perturbed = np.sort(np.random.default_rng(seed).choice(perturbed, n_cells, False))
        both = self.get_latent_representation(adata, perturbed, kind="both")
        n_salient = self.module.n_salient_latent
        return latent_activity(both[:, :n_salient], both[:, n_salient:])


class _Rows:
    """Rows ``rows`` of a matrix, indexable like it (for statistics of a subset of cells)."""

    def __init__(self, matrix, rows: np.ndarray) -> None:
        self.matrix, self.rows = matrix, rows
        self.shape = (len(rows), matrix.shape[1])

    def __getitem__(self, index):
        return self.matrix[self.rows[index]]
