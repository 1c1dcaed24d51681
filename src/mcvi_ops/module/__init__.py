"""Tensor-level modules: inference, generative model and loss of each model."""

from ._mcvae import GaussianImageLikelihood, MultiContrastiveVAE
from ._transform import CropTransform
from ._vae import ImageVAE

__all__ = ["CropTransform", "GaussianImageLikelihood", "ImageVAE", "MultiContrastiveVAE"]
