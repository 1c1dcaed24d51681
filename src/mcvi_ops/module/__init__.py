"""Tensor-level modules (scvi-tools ``BaseModuleClass``): tensors in, ``LossOutput`` out."""

from ._base import BaseImageVAE, GaussianImageLikelihood
from ._mcvae import MultiContrastiveVAE
from ._transform import CropTransform
from ._vae import ImageVAE

__all__ = [
    "BaseImageVAE",
    "CropTransform",
    "GaussianImageLikelihood",
    "ImageVAE",
    "MultiContrastiveVAE",
]
