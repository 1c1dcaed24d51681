"""Training data: the crop dataset, the balanced chunk-aware sampler, the loader and the splitter."""

from ._loader import CropDataLoader, CropDataset
from ._sampler import BalancedChunkSampler
from ._splitter import CropDataSplitter

__all__ = ["BalancedChunkSampler", "CropDataLoader", "CropDataSplitter", "CropDataset"]
