"""Standard VAE baseline on image crops: one encoder, one N(0, I) latent."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from scvi import REGISTRY_KEYS
from scvi.module.base import LossOutput, auto_move_data
from torch import nn
from torch.distributions import Normal, kl_divergence

from mcvi_ops.nn import ConvEncoder

from ._base import BaseImageVAE


class ImageVAE(BaseImageVAE):
    """A standard VAE on crops: ``q(z | x)``, ``p(z) = N(0, I)``, Gaussian pixel likelihood.

    Parameters
    ----------
    n_channels
        Channels of the crops.
    crop_size
        Height and width of the crops.
    n_batch
        Number of batch categories fed to the decoder (0: none).
    n_latent
        Dimension of the latent space.
    encoder_filters, decoder_filters, likelihood_scale, min_likelihood_scale, arcsinh_cofactor
        As in :class:`~mcvi_ops.module.MultiContrastiveVAE`.
    encoder, decoder
        Networks to use instead of the default convolutional ones.
    augment
        Train on random rotations by 90 degrees and mirror images of each crop.
    """

    def __init__(
        self,
        n_channels: int,
        crop_size: tuple[int, int],
        *,
        n_batch: int = 0,
        n_latent: int = 64,
        encoder_filters: Sequence[int] = (16, 32, 64, 128, 128),
        decoder_filters: Sequence[int] = (128, 128, 64, 32, 16),
        likelihood_scale: float = 0.1,
        min_likelihood_scale: float = 0.02,
        arcsinh_cofactor: float = 1.0,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        augment: bool = True,
    ) -> None:
        super().__init__(
            n_channels,
            crop_size,
            n_latent,
            n_batch=n_batch,
            decoder_filters=decoder_filters,
            likelihood_scale=likelihood_scale,
            min_likelihood_scale=min_likelihood_scale,
            arcsinh_cofactor=arcsinh_cofactor,
            decoder=decoder,
            augment=augment,
        )
        self.n_latent = n_latent
        self.encoder = encoder or ConvEncoder(
            n_channels, n_latent, crop_size=self.crop_size, n_filters=encoder_filters
        )

    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "x": tensors[REGISTRY_KEYS.X_KEY],
            "intensity_factors": self._intensity_factors(tensors),
        }

    def _get_generative_input(self, tensors: dict[str, torch.Tensor], inference_outputs: dict):
        return {"z": inference_outputs["z"], "batch_index": self._batch_index(tensors)}

    @auto_move_data
    def inference(
        self,
        x: torch.Tensor,
        intensity_factors: torch.Tensor | None = None,
        n_samples: int = 1,
    ) -> dict[str, torch.Tensor | Normal]:
        """Posterior of the latent."""
        x_transformed = self._prepare_input(x, intensity_factors)
        qz = self.encoder(x_transformed)
        z = qz.rsample((n_samples,)) if n_samples > 1 else qz.rsample()
        return {"qz": qz, "z": z, "x_transformed": x_transformed}

    @auto_move_data
    def generative(self, z: torch.Tensor, batch_index: torch.Tensor | None = None) -> dict:
        """The likelihood of the (transformed) crop given ``z``."""
        return self._decode([z], batch_index)

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
    ) -> LossOutput:
        """Negative ELBO with KL warm-up."""
        x = inference_outputs["x_transformed"]
        qz = inference_outputs["qz"]
        reconstruction = self._reconstruction_loss(generative_outputs["px"], x)
        kl_z = kl_divergence(qz, Normal(torch.zeros_like(qz.loc), 1.0)).sum(-1)
        loss = torch.mean(reconstruction + kl_weight * kl_z)
        return LossOutput(
            loss=loss,
            reconstruction_loss=reconstruction,
            kl_local=kl_z,
            extra_metrics=self._likelihood_metrics(),
        )

    @torch.inference_mode()
    def reconstruct(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decode posterior means, on the [-1, 1] scale."""
        qz = self.inference(**self._get_inference_input(tensors))["qz"]
        return self.generative(qz.loc, self._batch_index(tensors))["px_mean"]

    @torch.inference_mode()
    def sample(
        self, n_samples: int = 1, *, batch_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decode draws from the N(0, I) prior, on the [-1, 1] scale: (n_samples, C, H, W)."""
        z = torch.randn(n_samples, self.n_latent, device=self.device)
        return self.generative(z, batch_index)["px_mean"]
