"""Tensor-level modules (scvi-tools ``BaseModuleClass``): tensors in, ``LossOutput`` out."""

from ._base import BaseImageVAE, GaussianImageLikelihood
from ._contrastive import MultiContrastiveMixin
from ._decoding import GaussianLikelihood
from ._features import FeatureMultiContrastiveVAE
from ._mcvae import MultiContrastiveVAE
from ._transform import CropTransform
from ._vae import ImageVAE

__all__ = [
    "BaseImageVAE",
    "CropTransform",
    "FeatureMultiContrastiveVAE",
    "GaussianImageLikelihood",
    "GaussianLikelihood",
    "ImageVAE",
    "MultiContrastiveMixin",
    "MultiContrastiveVAE",
]
