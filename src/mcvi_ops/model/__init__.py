"""User-facing models: AnnData in, embeddings and images out."""

from mcvi_ops._logging import setup_logging

from ._features import FeatureMCVAE, default_feature_epochs
from ._mcvae import MCVAE
from ._save_load import UnsafeModelFileError
from ._train import default_max_epochs
from ._vae import VAE

# like scvi-tools: the package's INFO messages show in notebooks once the models are imported
setup_logging()

__all__ = [
    "MCVAE",
    "VAE",
    "FeatureMCVAE",
    "UnsafeModelFileError",
    "default_feature_epochs",
    "default_max_epochs",
]
