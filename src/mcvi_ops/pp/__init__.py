"""Preprocessing: channel alignment, clipping, tile -> crop extraction, covariates, intensities."""

from ._align import align_channels, clip_percentiles
from ._covariates import derive_covariates
from ._extract import extract_crops
from ._intensity import estimate_intensity_factors

__all__ = [
    "align_channels",
    "clip_percentiles",
    "derive_covariates",
    "estimate_intensity_factors",
    "extract_crops",
]
