"""Crop stores, links between AnnData rows and crops, scvi-tools fields, loaders and simulated screens."""

from ._fields import ImageField, PerturbationField
from ._link import get_crops, link_crops, linked_store
from ._loader import CropDataLoader, CropDataset, CropDataSplitter
from ._sampler import BalancedChunkSampler
from ._store import CropStore, CropWriter, open_crops, write_crops
from ._synthetic import synthetic_screen

__all__ = [
    "BalancedChunkSampler",
    "CropDataLoader",
    "CropDataSplitter",
    "CropDataset",
    "CropStore",
    "CropWriter",
    "ImageField",
    "PerturbationField",
    "get_crops",
    "link_crops",
    "linked_store",
    "open_crops",
    "synthetic_screen",
    "write_crops",
]
