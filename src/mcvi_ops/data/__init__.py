"""Crop stores, links between AnnData rows and crops, scvi-tools fields and simulated screens."""

from ._fields import ImageField
from ._link import get_crops, link_crops, linked_store
from ._store import CropStore, CropWriter, open_crops, write_crops
from ._synthetic import synthetic_screen

__all__ = [
    "CropStore",
    "CropWriter",
    "ImageField",
    "get_crops",
    "link_crops",
    "linked_store",
    "open_crops",
    "synthetic_screen",
    "write_crops",
]
