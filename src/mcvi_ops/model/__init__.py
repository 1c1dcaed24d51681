"""User-facing models: AnnData in, embeddings and images out."""

from ._base import default_max_epochs
from ._mcvae import MCVAE
from ._vae import VAE

__all__ = ["MCVAE", "VAE", "default_max_epochs"]
