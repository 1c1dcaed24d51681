"""Crop and feature loaders (training and inference), the balanced chunk-aware sampler, the splitters."""

from ._features import FeatureDataLoader, FeatureDataSplitter
from ._inference import InferenceLoader
from ._loader import CropDataLoader, CropDataset
from ._sampler import BalancedChunkSampler
from ._splitter import CropDataSplitter

__all__ = [
    "BalancedChunkSampler",
    "CropDataLoader",
    "CropDataSplitter",
    "CropDataset",
    "FeatureDataLoader",
    "FeatureDataSplitter",
    "InferenceLoader",
]
