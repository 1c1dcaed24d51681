"""Training data: crop and feature loaders, the balanced chunk-aware sampler, the splitters."""

from ._features import FeatureDataLoader, FeatureDataSplitter
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
]
