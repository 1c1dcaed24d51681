"""The Multi-Contrastive VAE module on per-cell feature tables: tensors in, LossOutput out."""

from __future__ import annotations

import torch
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn
from torch.distributions import Normal

from mcvi_ops._constants import PERTURBATION_KEY
from mcvi_ops.nn import MLPDecoder, MLPEncoder

from ._contrastive import ClassifierInput, MultiContrastiveMixin, PriorKind
from ._decoding import GaussianLikelihood, decoder_input

#: floor of the controls' variance along the covariates (the fitted variance can dip below 0)
MIN_TREND_VARIANCE = 0.05


class FeatureMultiContrastiveVAE(MultiContrastiveMixin, BaseModuleClass):
    """Multi-Contrastive VAE for per-cell feature vectors (CellProfiler and the like).

    The same objective as :class:`~mcvi_ops.module.MultiContrastiveVAE` (shared through
    :class:`~mcvi_ops.module.MultiContrastiveMixin`) with fully connected encoders and decoder.
    Raw features are standardised inside the module against the controls of their batch
    (``(x - center[batch]) / scale[batch]``, buffers saved with the weights); with continuous
    covariates, the controls' trend along them (``[1, c, c^2]`` per covariate, fitted on the
    controls, ``covariate_trend``) is removed too, so technical positions (the distance from the
    field-of-view centre, say) leave no trace in the features the encoders read: the controls'
    mean and variance along them (``covariate_trend``, ``covariate_variance``) are fitted on the
    controls and every cell is centred and scaled by them, which removes additive shifts and
    multiplicative ones such as vignetting. Non-finite
    values are set to 0 (the controls' centre), values are clipped to ``[-clip, clip]`` and
    features left out by ``feature_mask`` are 0 and not reconstructed. The decoder reads ``(z, s)``, the
    one-hot batch and continuous covariates (e.g. the distance from the field-of-view centre);
    the encoders read the features only.

    Parameters
    ----------
    n_features
        Number of features.
    n_perturbations
        Number of perturbation categories, the control category (code 0) included.
    n_batch
        Number of batch categories: rows of the standardisation tables, and decoder covariate
        (0: no batch; one standardisation row for all cells).
    n_continuous_covariates
        Number of continuous covariates fed to the decoder.
    n_salient_latent, n_background_latent, prior, wasserstein_penalty, classification_weight, classifier_input
        As in :class:`~mcvi_ops.module.MultiContrastiveVAE`.
    n_hidden
        Width of the hidden layers of encoders and decoder.
    n_layers
        Hidden layers of encoders and decoder.
    dropout_rate
        Dropout of the encoders' hidden layers.
    likelihood_scale
        Initial standard deviation of each standardised feature's Gaussian likelihood.
    min_likelihood_scale
        Lower bound on that standard deviation.
    clip
        Standardised values are clipped to ``[-clip, clip]``.
    background_encoder, salient_encoder, decoder
        Networks to use instead of the default :class:`~mcvi_ops.nn.MLPEncoder` and
        :class:`~mcvi_ops.nn.MLPDecoder`.
    """

    def __init__(
        self,
        n_features: int,
        n_perturbations: int,
        *,
        n_batch: int = 0,
        n_continuous_covariates: int = 0,
        n_salient_latent: int = 32,
        n_background_latent: int = 32,
        prior: PriorKind = "both",
        wasserstein_penalty: float = 8.0,
        classification_weight: float = 0.0,
        classifier_input: ClassifierInput = "salient",
        n_hidden: int = 256,
        n_layers: int = 2,
        dropout_rate: float = 0.1,
        likelihood_scale: float = 1.0,
        min_likelihood_scale: float = 0.05,
        clip: float = 10.0,
        background_encoder: nn.Module | None = None,
        salient_encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.n_features = n_features
        self.n_batch = n_batch
        self.n_continuous_covariates = n_continuous_covariates
        self.clip = float(clip)
        n_rows = max(n_batch, 1)
        self.register_buffer("feature_center", torch.zeros(n_rows, n_features))
        self.register_buffer("feature_scale", torch.ones(n_rows, n_features))
        self.register_buffer("feature_mask", torch.ones(n_features, dtype=torch.bool))
        # rows: intercept, then c and c^2 of each continuous covariate
        self.register_buffer(
            "covariate_trend", torch.zeros(1 + 2 * n_continuous_covariates, n_features)
        )
        variance = torch.zeros(1 + 2 * n_continuous_covariates, n_features)
        variance[0] = 1.0  # no trend: unit variance everywhere
        self.register_buffer("covariate_variance", variance)
        mlp = {"n_hidden": n_hidden, "n_layers": n_layers}
        self.background_encoder = background_encoder or MLPEncoder(
            n_features, n_background_latent, dropout_rate=dropout_rate, **mlp
        )
        self.salient_encoder = salient_encoder or MLPEncoder(
            n_features, n_salient_latent, dropout_rate=dropout_rate, **mlp
        )
        n_decoded = n_salient_latent + n_background_latent + n_batch + n_continuous_covariates
        self.decoder = decoder or MLPDecoder(n_decoded, n_features, **mlp)
        self.likelihood = GaussianLikelihood(
            (n_features,), scale_init=likelihood_scale, min_scale=min_likelihood_scale
        )
        self._init_contrastive(
            n_perturbations,
            n_salient_latent=n_salient_latent,
            n_background_latent=n_background_latent,
            prior=prior,
            wasserstein_penalty=wasserstein_penalty,
            classification_weight=classification_weight,
            classifier_input=classifier_input,
        )

    # --- standardisation ------------------------------------------------------------------
    @torch.no_grad()
    def set_standardization(
        self,
        center: torch.Tensor,
        scale: torch.Tensor,
        mask: torch.Tensor,
        trend: torch.Tensor | None = None,
        variance: torch.Tensor | None = None,
    ) -> None:
        """Set the standardisation: per-batch centres and scales, kept features, covariate trend.

        ``center`` and ``scale`` are (rows x features), ``mask`` (features,), ``trend`` and
        ``variance`` (``1 + 2 * n_covariates`` x features): the controls' mean and variance along
        the covariates.
        """
        self.feature_center.copy_(torch.as_tensor(center, dtype=torch.float32))
        self.feature_scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
        self.feature_mask.copy_(torch.as_tensor(mask, dtype=torch.bool))
        if trend is not None:
            self.covariate_trend.copy_(torch.as_tensor(trend, dtype=torch.float32))
        if variance is not None:
            self.covariate_variance.copy_(torch.as_tensor(variance, dtype=torch.float32))

    @staticmethod
    def trend_terms(covariates: torch.Tensor) -> torch.Tensor:
        """``[1, c, c^2]`` of each continuous covariate: (B, 1 + 2 * n_covariates)."""
        covariates = covariates.float()
        ones = torch.ones(covariates.shape[0], 1, device=covariates.device)
        return torch.cat([ones, covariates, covariates.pow(2)], dim=1)

    def standardize(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        center: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        continuous_covariates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw features (B, F) -> standardised, clipped float32 features (B, F).

        ``center`` and ``scale`` (B, F) replace the tables' rows for cells of batches the model
        was not trained on; ``continuous_covariates`` (B, n) remove the controls' trend.
        """
        if center is None or scale is None:
            rows = (
                torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
                if batch_index is None or self.n_batch == 0
                else batch_index.reshape(-1).long()
            )
            center, scale = self.feature_center[rows], self.feature_scale[rows]
        y = (x.float() - center) / scale
        if self.n_continuous_covariates and continuous_covariates is not None:
            terms = self.trend_terms(continuous_covariates)
            variance = (terms @ self.covariate_variance).clamp(min=MIN_TREND_VARIANCE)
            y = (y - terms @ self.covariate_trend) / variance.sqrt()
        y = torch.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0).clamp(-self.clip, self.clip)
        return y * self.feature_mask.to(y.dtype)

    # --- scvi-tools module contract -------------------------------------------------------
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "x": tensors[REGISTRY_KEYS.X_KEY],
            "perturbation": tensors[PERTURBATION_KEY],
            "batch_index": tensors.get(REGISTRY_KEYS.BATCH_KEY),
            "continuous_covariates": tensors.get(REGISTRY_KEYS.CONT_COVS_KEY),
        }

    def _decoder_covariates(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "batch_index": tensors.get(REGISTRY_KEYS.BATCH_KEY),
            "continuous_covariates": tensors.get(REGISTRY_KEYS.CONT_COVS_KEY),
        }

    @auto_move_data
    def inference(
        self,
        x: torch.Tensor,
        perturbation: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        continuous_covariates: torch.Tensor | None = None,
        center: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        n_samples: int = 1,
    ) -> dict[str, torch.Tensor | Normal]:
        """Posteriors of ``z`` and ``s`` of raw features; ``s`` of control cells is exactly 0."""
        x_standardized = self.standardize(x, batch_index, center, scale, continuous_covariates)
        return {
            **self._encode(x_standardized, perturbation, n_samples),
            "x_standardized": x_standardized,
        }

    def _decode(
        self,
        latents: list[torch.Tensor],
        batch_index: torch.Tensor | None = None,
        continuous_covariates: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | Normal]:
        if self.n_continuous_covariates == 0:
            continuous_covariates = None
        elif continuous_covariates is None:
            msg = "This module was built with continuous covariates; pass `continuous_covariates`."
            raise ValueError(msg)
        latent = decoder_input(latents, batch_index, self.n_batch, continuous_covariates)
        lead = latent.shape[:-1]
        mean = self.decoder(latent.reshape(-1, latent.shape[-1])).float()
        mean = mean.reshape(*lead, mean.shape[-1])
        return {"px": self.likelihood(mean), "px_mean": mean}

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
    ) -> LossOutput:
        """The objective of :class:`~mcvi_ops.module.MultiContrastiveMixin` on features."""
        x = inference_outputs["x_standardized"]
        log_prob = generative_outputs["px"].log_prob(x) * self.feature_mask.to(x.dtype)
        reconstruction = -log_prob.sum(-1)
        metrics = {"likelihood_scale": self.likelihood.scale[self.feature_mask].mean().detach()}
        return self._contrastive_loss(
            tensors, inference_outputs, reconstruction, kl_weight, extra_metrics=metrics
        )
