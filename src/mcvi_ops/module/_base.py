"""What the image VAE modules share: input transform, decoder, pixel likelihood, control mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass
from torch import nn
from torch.distributions import Normal

from mcvi_ops._constants import INTENSITY_FACTOR_KEY
from mcvi_ops.nn import ConvDecoder

from ._decoding import GaussianImageLikelihood, decoder_input
from ._transform import CropTransform


def random_dihedral(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rotate each crop of (B, C, H, W) by a random multiple of 90 degrees and flip it at random.

    A cell's phenotype does not depend on its orientation in the crop; training on the eight
    rotations and mirror images of each crop (input and reconstruction target alike) keeps the
    latents from spending dimensions on orientation. Non-square crops only get the rotations and
    flips that keep their shape (0 or 180 degrees).
    """
    n = x.shape[0]
    device = x.device
    flip = torch.rand(n, device=device, generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    square = x.shape[-1] == x.shape[-2]
    turns = torch.randint(0, 4 if square else 3, (n,), device=device, generator=generator)
    if not square:
        turns = torch.where(turns == 1, torch.full_like(turns, 2), turns)  # 0, 2 (or 2) only
    out = x.clone()
    for k in (1, 2, 3):
        rows = torch.nonzero(turns == k).reshape(-1)
        if len(rows):
            out[rows] = torch.rot90(x[rows], k, dims=(-2, -1))
    return out


class BaseImageVAE(BaseModuleClass):
    """Base of the image VAE modules: transform, decoder, likelihood and reconstruction term.

    Subclasses add their encoders and priors and implement ``inference``, ``loss`` and
    ``reconstruct``.

    Parameters
    ----------
    n_channels
        Channels of the crops.
    crop_size
        Height and width of the crops.
    n_latent_decoded
        Width of the latent code the decoder reads (without the batch covariate).
    n_batch
        Number of batch categories fed to the decoder (0: none).
    decoder_filters
        Channels of the five decoder transposed convolutions.
    likelihood_scale
        Initial per-pixel standard deviation of the Gaussian likelihood (on the [-1, 1] scale).
    min_likelihood_scale
        Lower bound on that standard deviation.
    arcsinh_cofactor
        Cofactor of the arcsinh input transform.
    decoder
        Network to use instead of the default :class:`~mcvi_ops.nn.ConvDecoder`.
    augment
        During training, show each crop in a random one of its eight orientations (rotations by
        90 degrees and mirror images), as input and as reconstruction
        target alike. Inference never augments.
    """

    def __init__(
        self,
        n_channels: int,
        crop_size: tuple[int, int],
        n_latent_decoded: int,
        *,
        n_batch: int = 0,
        decoder_filters: Sequence[int] = (128, 128, 64, 32, 16),
        likelihood_scale: float = 0.1,
        min_likelihood_scale: float = 0.02,
        arcsinh_cofactor: float = 1.0,
        decoder: nn.Module | None = None,
        augment: bool = True,
    ) -> None:
        super().__init__()
        self.augment = bool(augment)
        self.n_channels = n_channels
        self.crop_size = tuple(int(s) for s in crop_size)
        self.n_batch = n_batch
        self.transform = CropTransform(n_channels, cofactor=arcsinh_cofactor)
        # the camera's dark level, kept in place when crops are divided by intensity factors
        self.register_buffer("dark_level", torch.zeros(n_channels, 1, 1))
        self.decoder = decoder or ConvDecoder(
            n_latent_decoded + n_batch,
            n_channels,
            crop_size=self.crop_size,
            n_filters=decoder_filters,
        )
        self.likelihood = GaussianImageLikelihood(
            n_channels, scale_init=likelihood_scale, min_scale=min_likelihood_scale
        )

    def correct_intensity(
        self, x: torch.Tensor, intensity_factors: torch.Tensor | None
    ) -> torch.Tensor:
        """Divide raw crops (B, C, H, W) by per-cell factors (B, C) above the dark level.

        The factors (illumination across the field of view times batch gains, see
        :func:`~mcvi_ops.pp.estimate_intensity_factors`) are optional; `None` leaves ``x`` as is.
        """
        if intensity_factors is None:
            return x
        factors = intensity_factors.to(torch.float32).reshape(*x.shape[:2], 1, 1)
        dark = self.dark_level.to(torch.float32)
        return (x.float() - dark) / factors + dark

    @staticmethod
    def _intensity_factors(tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return tensors.get(INTENSITY_FACTOR_KEY)

    def _prepare_input(
        self, x: torch.Tensor, intensity_factors: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Raw crops -> the model's [-1, 1] scale, in a random orientation while training."""
        x_transformed = self.transform(self.correct_intensity(x, intensity_factors))
        if self.training and self.augment:
            x_transformed = random_dihedral(x_transformed)
        return x_transformed

    @staticmethod
    def _batch_index(tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return tensors.get(REGISTRY_KEYS.BATCH_KEY)

    def _decoder_covariates(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the decoder reads besides the latents: the batch."""
        return {"batch_index": self._batch_index(tensors)}

    def _decode(
        self, latents: list[torch.Tensor], batch_index: torch.Tensor | None
    ) -> dict[str, torch.Tensor | Normal]:
        """The likelihood of the (transformed) crop given latent codes (any leading dims)."""
        latent = decoder_input(latents, batch_index, self.n_batch)
        lead = latent.shape[:-1]
        # float32 likelihood under mixed precision: it sums over every pixel of the crop
        mean = self.decoder(latent.reshape(-1, latent.shape[-1])).float()
        mean = mean.reshape(*lead, *mean.shape[1:])
        return {"px": self.likelihood(mean), "px_mean": mean}

    @staticmethod
    def _reconstruction_loss(px: Normal, x_transformed: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of each crop, summed over its pixels: shape (B,)."""
        return -px.log_prob(x_transformed).sum(dim=(-3, -2, -1))

    def _likelihood_metrics(self) -> dict[str, torch.Tensor]:
        return {"likelihood_scale": self.likelihood.scale.mean().detach()}
