"""Convolutional encoder and decoder blocks for image crops."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributions import Normal

_MIN_VARIANCE = 1e-4


def _as_pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = (int(s) for s in size)
    return height, width


def group_norm(channels: int) -> nn.GroupNorm:
    """Per-sample normalisation (GroupNorm, up to 8 groups).

    Not batch norm: training batches are read window by window from a store ordered by plate,
    well and tile, so a batch's statistics are those of a few wells; batch norm would remove
    the well's intensity in training and not at inference (running averages), and the latents
    would carry the well after all.
    """
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def downsampled_sizes(size: int, n_layers: int) -> list[int]:
    """Spatial sizes after each stride-2 convolution (kernel 3, padding 1), input first."""
    sizes = [int(size)]
    for _ in range(n_layers):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


class ConvEncoder(nn.Module):
    """Map image crops to a diagonal Gaussian over a latent space.

    A stack of stride-2 convolutions (kernel 3, padding 1), each followed by group normalisation
    and a leaky ReLU, then a linear layer to the posterior mean and log-variance.

    Parameters
    ----------
    n_channels
        Channels of the input crops.
    n_latent
        Dimension of the latent space.
    crop_size
        Height and width of the input crops (an int for square crops).
    n_filters
        Output channels of each convolution; its length is the number of conv layers.
    """

    def __init__(
        self,
        n_channels: int,
        n_latent: int,
        *,
        crop_size: int | Sequence[int] = 64,
        n_filters: Sequence[int] = (16, 32, 64, 128, 128),
    ) -> None:
        super().__init__()
        height, width = _as_pair(crop_size)
        layers: list[nn.Module] = []
        in_channels = n_channels
        for out_channels in n_filters:
            layers += [
                # no bias: the normalisation right after removes it
                nn.Conv2d(
                    in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False
                ),
                group_norm(out_channels),
                nn.LeakyReLU(0.2),
            ]
            in_channels = out_channels
        self.features = nn.Sequential(*layers, nn.Flatten())
        out_h = downsampled_sizes(height, len(n_filters))[-1]
        out_w = downsampled_sizes(width, len(n_filters))[-1]
        n_flat = in_channels * out_h * out_w
        self.mean = nn.Linear(n_flat, n_latent)
        self.log_var = nn.Linear(n_flat, n_latent)
        self.n_latent = n_latent

    def forward(self, x: torch.Tensor) -> Normal:
        """Posterior ``q(latent | x)`` for a batch of crops of shape (B, C, H, W)."""
        h = self.features(x)
        # the posterior stays float32 under mixed precision (KL terms are sums of small numbers)
        mean = self.mean(h).float()
        std = torch.sqrt(torch.exp(self.log_var(h).float().clamp(-15.0, 10.0)) + _MIN_VARIANCE)
        return Normal(mean, std)


class ConvDecoder(nn.Module):
    """Map latent codes to image crops with values in [-1, 1].

    A linear layer to a small feature map, then stride-2 transposed convolutions (each followed by
    group normalisation and a leaky ReLU) back to the crop size, a final 3x3 convolution to the
    image channels, and a tanh.

    Parameters
    ----------
    n_input
        Dimension of the decoder input (latent codes and covariates, concatenated).
    n_channels
        Channels of the output crops.
    crop_size
        Height and width of the output crops; any size is reached exactly.
    n_filters
        Channels of the feature maps, from the smallest map up; its length is the number of
        transposed convolutions.
    """

    def __init__(
        self,
        n_input: int,
        n_channels: int,
        *,
        crop_size: int | Sequence[int] = 64,
        n_filters: Sequence[int] = (128, 128, 64, 32, 16),
    ) -> None:
        super().__init__()
        height, width = _as_pair(crop_size)
        heights = downsampled_sizes(height, len(n_filters))[::-1]
        widths = downsampled_sizes(width, len(n_filters))[::-1]
        self._start = (n_filters[0], heights[0], widths[0])
        self.project = nn.Sequential(
            nn.Linear(n_input, n_filters[0] * heights[0] * widths[0]), nn.LeakyReLU(0.2)
        )
        layers: list[nn.Module] = []
        in_channels = n_filters[0]
        out_filters = [*n_filters[1:], n_filters[-1]]
        for i, out_channels in enumerate(out_filters):
            # output_padding picks the exact size, so odd crop sizes (e.g. 100 -> 50 -> 25) work
            pad_h = heights[i + 1] - (2 * heights[i] - 1)
            pad_w = widths[i + 1] - (2 * widths[i] - 1)
            layers += [
                nn.ConvTranspose2d(
                    in_channels,
                    out_channels,
                    kernel_size=3,
                    stride=2,
                    padding=1,
                    output_padding=(pad_h, pad_w),
                    bias=False,
                ),
                group_norm(out_channels),
                nn.LeakyReLU(0.2),
            ]
            in_channels = out_channels
        layers += [nn.Conv2d(in_channels, n_channels, kernel_size=3, padding=1), nn.Tanh()]
        self.upsample = nn.Sequential(*layers)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """Decoded crops of shape (B, C, H, W) for latent codes of shape (B, n_input)."""
        h = self.project(latent).view(-1, *self._start)
        return self.upsample(h)
