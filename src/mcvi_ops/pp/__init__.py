"""Preprocessing: channel alignment, intensity clipping, tile -> crop extraction, covariates."""

from ._align import align_channels, clip_percentiles
from ._covariates import derive_covariates
from ._extract import extract_crops

__all__ = ["align_channels", "clip_percentiles", "derive_covariates", "extract_crops"]
