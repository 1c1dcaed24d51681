"""The Multi-Contrastive VAE module: tensors in, LossOutput out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module import Classifier
from scvi.module.base import LossOutput, auto_move_data
from torch import nn
from torch.distributions import Normal, kl_divergence

from mcvi_ops._constants import PERTURBATION_KEY
from mcvi_ops.nn import ConvEncoder

from ._base import BaseImageVAE, is_control, zero_controls

PriorKind = Literal["both", "salient", "background", "none"]


class MultiContrastiveVAE(BaseImageVAE):
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
        classify_controls: bool = True,
        classifier_input: Literal["salient", "both"] = "salient",
        anneal_wasserstein: bool = False,
        salient_kl_weight: float = 1.0,
        background_kl_weight: float = 1.0,
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
        self.n_perturbations = n_perturbations
        self.n_salient_latent = n_salient_latent
        self.n_background_latent = n_background_latent
        self.prior = prior
        self.wasserstein_penalty = wasserstein_penalty
        self.classification_weight = float(classification_weight)
        self.classify_controls = bool(classify_controls)
        self.classifier_input = classifier_input
        self.anneal_wasserstein = bool(anneal_wasserstein)
        self.salient_kl_weight = float(salient_kl_weight)
        self.background_kl_weight = float(background_kl_weight)
        # a linear read-out of the perturbation from the salient posterior mean
        self.classifier = (
            Classifier(
                n_salient_latent + (n_background_latent if classifier_input == "both" else 0),
                n_hidden=0,
                n_labels=n_perturbations,
                n_layers=0,
                logits=True,
            )
            if classification_weight > 0
            else None
        )
        self.background_encoder = background_encoder or ConvEncoder(
            n_channels, n_background_latent, crop_size=self.crop_size, n_filters=encoder_filters
        )
        self.salient_encoder = salient_encoder or ConvEncoder(
            n_channels, n_salient_latent, crop_size=self.crop_size, n_filters=encoder_filters
        )
        # learned prior means; row 0 (controls) of the background table is masked to 0
        self.background_prior_mean = (
            nn.Embedding(n_perturbations, n_background_latent)
            if prior in ("both", "background")
            else None
        )
        self.salient_prior_mean = (
            nn.Embedding(n_perturbations, n_salient_latent)
            if prior in ("both", "salient")
            else None
        )
        for table in (self.background_prior_mean, self.salient_prior_mean):
            if table is not None:
                nn.init.zeros_(table.weight)

    # --- priors ---------------------------------------------------------------------------
    def prior_means(self, perturbation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prior means of ``z`` and ``s`` for perturbation codes of shape (B,) or (B, 1)."""
        codes = perturbation.reshape(-1).long()
        perturbed = (~is_control(codes)).unsqueeze(-1).float()
        shape_z = (codes.shape[0], self.n_background_latent)
        shape_s = (codes.shape[0], self.n_salient_latent)
        device = codes.device
        mean_z = (
            self.background_prior_mean(codes) * perturbed
            if self.background_prior_mean is not None
            else torch.zeros(shape_z, device=device)
        )
        mean_s = (
            self.salient_prior_mean(codes) * perturbed
            if self.salient_prior_mean is not None
            else torch.zeros(shape_s, device=device)
        )
        return mean_z, mean_s

    # --- scvi-tools module contract -------------------------------------------------------
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "x": tensors[REGISTRY_KEYS.X_KEY],
            "perturbation": tensors[PERTURBATION_KEY],
            "intensity_factors": self._intensity_factors(tensors),
        }

    def _get_generative_input(
        self, tensors: dict[str, torch.Tensor], inference_outputs: dict
    ) -> dict[str, torch.Tensor | None]:
        return {
            "z": inference_outputs["z"],
            "s": inference_outputs["s"],
            "batch_index": self._batch_index(tensors),
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
        qz = self.background_encoder(x_transformed)
        qs = self.salient_encoder(x_transformed)
        if n_samples > 1:
            z, s = qz.rsample((n_samples,)), qs.rsample((n_samples,))
        else:
            z, s = qz.rsample(), qs.rsample()
        s = zero_controls(s, perturbation)
        return {"qz": qz, "qs": qs, "z": z, "s": s, "x_transformed": x_transformed}

    @auto_move_data
    def generative(
        self, z: torch.Tensor, s: torch.Tensor, batch_index: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | Normal]:
        """The likelihood of the (transformed) crop given ``z`` and ``s``."""
        return self._decode([z, s], batch_index)

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
    ) -> LossOutput:
        """ELBO with KL warm-up, plus the Wasserstein penalty on controls' salient posterior."""
        x = inference_outputs["x_transformed"]
        qz, qs = inference_outputs["qz"], inference_outputs["qs"]
        perturbation = tensors[PERTURBATION_KEY].reshape(-1)
        control = is_control(perturbation).float()
        reconstruction = self._reconstruction_loss(generative_outputs["px"], x)
        mean_z, mean_s = self.prior_means(perturbation)
        kl_z = kl_divergence(qz, Normal(mean_z, torch.ones_like(mean_z))).sum(-1)
        kl_s = kl_divergence(qs, Normal(mean_s, torch.ones_like(mean_s))).sum(-1)
        kl_s = kl_s * (1.0 - control)
        wasserstein = (qs.loc.pow(2) + qs.scale.pow(2)).sum(-1) * control
        w_weight = self.wasserstein_penalty * (kl_weight if self.anneal_wasserstein else 1.0)
        per_cell = (
            reconstruction
            + kl_weight * (self.background_kl_weight * kl_z + self.salient_kl_weight * kl_s)
            + w_weight * wasserstein
        )
        n_control = control.sum().clamp(min=1.0)
        extra = {"wasserstein_control": wasserstein.sum() / n_control, **self._likelihood_metrics()}
        if self.classifier is not None:
            features = (
                qs.loc if self.classifier_input == "salient" else torch.cat([qs.loc, qz.loc], -1)
            )
            classification, accuracy = self._classification(features, perturbation, control)
            per_cell = per_cell + self.classification_weight * classification
            extra["classification_loss"] = classification.sum() / (1.0 - control).sum().clamp(min=1)
            extra["classification_accuracy"] = accuracy
        return LossOutput(
            loss=torch.mean(per_cell),
            reconstruction_loss=reconstruction,
            kl_local={"kl_background": kl_z, "kl_salient": kl_s},
            extra_metrics=extra,
        )

    def _classification(
        self, salient_mean: torch.Tensor, perturbation: torch.Tensor, control: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of each cell's perturbation read from ``s`` (B,), accuracy on perturbed."""
        logits = self.classifier(salient_mean).float()
        labels = perturbation.long()
        ce = F.cross_entropy(logits, labels, reduction="none")
        weight = torch.ones_like(control) if self.classify_controls else 1.0 - control
        perturbed = control < 0.5
        hits = (logits.argmax(-1) == labels)[perturbed].float()
        accuracy = hits.mean() if hits.numel() else torch.zeros((), device=logits.device)
        return ce * weight, accuracy.detach()

    @torch.inference_mode()
    def reconstruct(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decode posterior means (controls with ``s = 0``), on the [-1, 1] scale."""
        out = self.inference(**self._get_inference_input(tensors))
        s = zero_controls(out["qs"].loc, tensors[PERTURBATION_KEY])
        return self.generative(out["qz"].loc, s, self._batch_index(tensors))["px_mean"]

    @torch.inference_mode()
    def sample(
        self,
        perturbation: torch.Tensor,
        *,
        n_samples: int = 1,
        batch_index: torch.Tensor | None = None,
        use_prior_mean: bool = False,
    ) -> torch.Tensor:
        """Decode draws from the prior of each given perturbation, on the [-1, 1] scale.

        Returns a tensor of shape (n_samples, B, C, H, W).
        """
        mean_z, mean_s = self.prior_means(perturbation.to(self.device))
        if use_prior_mean:
            z = mean_z.expand(n_samples, *mean_z.shape)
            s = mean_s.expand(n_samples, *mean_s.shape)
        else:
            z = Normal(mean_z, 1.0).sample((n_samples,))
            s = Normal(mean_s, 1.0).sample((n_samples,))
        return self.generative(z, zero_controls(s, perturbation), batch_index)["px_mean"]
