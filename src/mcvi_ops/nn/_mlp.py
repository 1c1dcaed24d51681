"""Fully connected encoder and decoder blocks for per-cell feature tables."""

from __future__ import annotations

import torch
from scvi.nn import FCLayers
from torch import nn
from torch.distributions import Normal

from ._conv import _MIN_VARIANCE


class MLPEncoder(nn.Module):
    """Map feature vectors to a diagonal Gaussian over a latent space.

    scvi-tools' :class:`~scvi.nn.FCLayers` (linear, layer normalisation, ReLU, dropout), then a
    linear layer to the posterior mean and log-variance. Same call signature as
    :class:`ConvEncoder`, so the feature and image modules share their latent machinery.

    Parameters
    ----------
    n_input
        Number of input features.
    n_latent
        Dimension of the latent space.
    n_hidden
        Width of the hidden layers.
    n_layers
        Number of hidden layers.
    dropout_rate
        Dropout after each hidden layer.

    Examples
    --------
    >>> encoder = MLPEncoder(100, 8)
    >>> encoder(torch.zeros(5, 100)).loc.shape
    torch.Size([5, 8])
    """

    def __init__(
        self,
        n_input: int,
        n_latent: int,
        *,
        n_hidden: int = 256,
        n_layers: int = 2,
        dropout_rate: float = 0.1,
    ) -> None:
        super().__init__()
        # layer norm, not batch norm: statistics of one cell never depend on its minibatch
        self.features = FCLayers(
            n_input,
            n_hidden,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            use_batch_norm=False,
            use_layer_norm=True,
        )
        self.mean = nn.Linear(n_hidden, n_latent)
        self.log_var = nn.Linear(n_hidden, n_latent)
        self.n_latent = n_latent

    def forward(self, x: torch.Tensor) -> Normal:
        """Posterior ``q(latent | x)`` for a batch of feature vectors of shape (B, n_input)."""
        h = self.features(x)
        mean = self.mean(h).float()
        std = torch.sqrt(torch.exp(self.log_var(h).float().clamp(-15.0, 10.0)) + _MIN_VARIANCE)
        return Normal(mean, std)


class MLPDecoder(nn.Module):
    """Map latent codes (and covariates, concatenated) to the mean of each feature.

    Parameters
    ----------
    n_input
        Dimension of the decoder input (latent codes and covariates, concatenated).
    n_output
        Number of features.
    n_hidden
        Width of the hidden layers.
    n_layers
        Number of hidden layers.
    dropout_rate
        Dropout after each hidden layer.

    Examples
    --------
    >>> MLPDecoder(16, 100)(torch.zeros(5, 16)).shape
    torch.Size([5, 100])
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        *,
        n_hidden: int = 256,
        n_layers: int = 2,
        dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.features = FCLayers(
            n_input,
            n_hidden,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            use_batch_norm=False,
            use_layer_norm=True,
        )
        self.output = nn.Linear(n_hidden, n_output)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """Decoded feature means of shape (B, n_output) for inputs of shape (B, n_input)."""
        return self.output(self.features(latent))
