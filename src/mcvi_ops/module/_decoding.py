"""What every decoder of the package shares: its input, and the Gaussian likelihood."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal


def decoder_input(
    latents: list[torch.Tensor],
    batch_index: torch.Tensor | None,
    n_batch: int,
    continuous: torch.Tensor | None = None,
) -> torch.Tensor:
    """Concatenate latent codes, the one-hot batch (``n_batch > 0``) and continuous covariates."""
    parts = list(latents)
    if n_batch > 0:
        if batch_index is None:
            msg = "This module was built with a batch covariate; pass `batch_index`."
            raise ValueError(msg)
        one_hot = F.one_hot(batch_index.reshape(-1).long(), n_batch).to(parts[0].dtype)
        parts.append(one_hot.expand(*parts[0].shape[:-1], n_batch))
    if continuous is not None:
        continuous = continuous.to(parts[0].dtype)
        parts.append(continuous.expand(*parts[0].shape[:-1], continuous.shape[-1]))
    return torch.cat(parts, dim=-1)


class GaussianLikelihood(nn.Module):
    """Gaussian with a learned scale of the given shape, bounded below by ``min_scale``.

    Parameters
    ----------
    shape
        Shape of the scale parameter, broadcast against the mean (e.g. ``(n_features,)``).
    scale_init
        Initial standard deviation.
    min_scale
        Lower bound on the standard deviation.
    """

    def __init__(self, shape: Sequence[int], *, scale_init: float, min_scale: float) -> None:
        super().__init__()
        self.min_scale = float(min_scale)
        offset = max(scale_init - min_scale, 1e-4)
        self.raw_scale = nn.Parameter(
            torch.full(tuple(shape), float(torch.log(torch.expm1(torch.tensor(offset)))))
        )

    @property
    def scale(self) -> torch.Tensor:
        """The standard deviation, of the parameter's shape."""
        return F.softplus(self.raw_scale) + self.min_scale

    def forward(self, mean: torch.Tensor) -> Normal:
        """The likelihood ``p(x | mean)``."""
        return Normal(mean, self.scale.to(mean.dtype).expand_as(mean))


class GaussianImageLikelihood(GaussianLikelihood):
    """Per-pixel Gaussian with a learned per-channel scale, bounded below by ``min_scale``."""

    def __init__(self, n_channels: int, *, scale_init: float, min_scale: float) -> None:
        super().__init__((n_channels, 1, 1), scale_init=scale_init, min_scale=min_scale)
