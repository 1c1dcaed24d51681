"""The Multi-Contrastive VAE module on image crops: tensors in, LossOutput out."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from scvi import REGISTRY_KEYS
from scvi.module.base import LossOutput, auto_move_data
from torch import nn
from torch.distributions import Normal

from mcvi_ops._constants import PERTURBATION_KEY
from mcvi_ops.nn import ConvEncoder

from ._base import BaseImageVAE
from ._contrastive import ClassifierInput, MultiContrastiveMixin, PriorKind


class MultiContrastiveVAE(MultiContrastiveMixin, BaseImageVAE):
    """Multi-Contrastive VAE for image crops of perturbed and control cells.

    Two convolutional encoders give the background latent ``z`` and the salient latent ``s``; one
    decoder rebuilds the crop from ``(z, s)`` (and an optional batch one-hot). Control cells are
    decoded with ``s = 0``, get no KL term on ``s`` and a Wasserstein penalty
    ``||mu_s||^2 + sum(sigma_s^2)`` pulling ``q(s | x)`` to a point mass at 0. Perturbed cells have
    priors ``N(mu_z[g], I)`` and ``N(mu_s[g], I)`` with learned per-perturbation means; controls'
    ``z`` prior mean is fixed at 0.

    Parameters
    ----------
    n_channels
        Channels of the crops.
    crop_size
        Height and width of the crops.
    n_perturbations
        Number of perturbation categories, the control category (code 0) included.
    n_batch
        Number of batch categories fed to the decoder (0: none).
    n_salient_latent
        Dimension of ``s``.
    n_background_latent
        Dimension of ``z``.
    prior
        Which latents get learned per-perturbation prior means: ``"both"`` (mcVAE),
        ``"salient"``, ``"background"`` or ``"none"`` (the contrastive VAE).
    wasserstein_penalty
        Weight of the Wasserstein penalty on controls' ``q(s | x)``.
    classification_weight
        Weight of the cross-entropy of a linear read-out of each cell's perturbation from its
        posterior means (0: none).
    classifier_input
        ``"salient"``: one read-out, of ``s``; ``"both"``: a second, separate read-out of ``z``
        with the same weight.
    encoder_filters
        Channels of the five encoder convolutions.
    decoder_filters
        Channels of the five decoder transposed convolutions.
    likelihood_scale
        Initial per-pixel standard deviation of the Gaussian likelihood (on the [-1, 1] scale).
    min_likelihood_scale
        Lower bound on that standard deviation.
    arcsinh_cofactor
        Cofactor of the arcsinh input transform.
    background_encoder, salient_encoder, decoder
        Networks to use instead of the default convolutional ones (same call signatures as
        :class:`~mcvi_ops.nn.ConvEncoder` and :class:`~mcvi_ops.nn.ConvDecoder`).
    augment
        Train on random rotations by 90 degrees and mirror images of each crop (see
        :class:`~mcvi_ops.module.BaseImageVAE`).
    """

    def __init__(
        self,
        n_channels: int,
        crop_size: tuple[int, int],
        n_perturbations: int,
        *,
        n_batch: int = 0,
        n_salient_latent: int = 32,
        n_background_latent: int = 32,
        prior: PriorKind = "both",
        wasserstein_penalty: float = 1000.0,
        classification_weight: float = 0.0,
        classifier_input: ClassifierInput = "salient",
        encoder_filters: Sequence[int] = (16, 32, 64, 128, 128),
        decoder_filters: Sequence[int] = (128, 128, 64, 32, 16),
        likelihood_scale: float = 0.1,
        min_likelihood_scale: float = 0.02,
        arcsinh_cofactor: float = 1.0,
        background_encoder: nn.Module | None = None,
        salient_encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        augment: bool = True,
    ) -> None:
        super().__init__(
            n_channels,
            crop_size,
            n_background_latent + n_salient_latent,
            n_batch=n_batch,
            decoder_filters=decoder_filters,
            likelihood_scale=likelihood_scale,
            min_likelihood_scale=min_likelihood_scale,
            arcsinh_cofactor=arcsinh_cofactor,
            decoder=decoder,
            augment=augment,
        )
        self.background_encoder = background_encoder or ConvEncoder(
            n_channels, n_background_latent, crop_size=self.crop_size, n_filters=encoder_filters
        )
        self.salient_encoder = salient_encoder or ConvEncoder(
            n_channels, n_salient_latent, crop_size=self.crop_size, n_filters=encoder_filters
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

    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "x": tensors[REGISTRY_KEYS.X_KEY],
            "perturbation": tensors[PERTURBATION_KEY],
            "intensity_factors": self._intensity_factors(tensors),
        }

    @auto_move_data
    def inference(
        self,
        x: torch.Tensor,
        perturbation: torch.Tensor,
        intensity_factors: torch.Tensor | None = None,
        n_samples: int = 1,
    ) -> dict[str, torch.Tensor | Normal]:
        """Posteriors of ``z`` and ``s``; ``s`` of control cells is set to exactly 0."""
        x_transformed = self._prepare_input(x, intensity_factors)
        return {
            **self._encode(x_transformed, perturbation, n_samples),
            "x_transformed": x_transformed,
        }

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
    ) -> LossOutput:
        """The objective of :class:`~mcvi_ops.module.MultiContrastiveMixin` on crops."""
        reconstruction = self._reconstruction_loss(
            generative_outputs["px"], inference_outputs["x_transformed"]
        )
        return self._contrastive_loss(
            tensors,
            inference_outputs,
            reconstruction,
            kl_weight,
            extra_metrics=self._likelihood_metrics(),
        )
