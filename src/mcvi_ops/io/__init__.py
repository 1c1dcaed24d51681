"""From raw optical-pooled-screen images, or from existing crops, to crop stores and AnnData."""

from ._align import align_channels, clip_percentiles
from ._extract import extract_crops
from ._from_crops import crops_from_array, crops_from_files
from ._tables import read_cells
from ._tiles import MissingTileError, read_image

__all__ = [
    "MissingTileError",
    "align_channels",
    "clip_percentiles",
    "crops_from_array",
    "crops_from_files",
    "extract_crops",
    "read_cells",
    "read_image",
]
