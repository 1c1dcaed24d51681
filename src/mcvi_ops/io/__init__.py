"""Readers and writers of outside formats: cell tables, images, and crops made elsewhere."""

from mcvi_ops._lazy import lazy_getattr

from ._from_crops import crops_from_array, crops_from_files
from ._images import MissingTileError, read_image
from ._tables import read_cells

__all__ = [
    "MissingTileError",
    "crops_from_array",
    "crops_from_files",
    "read_cells",
    "read_image",
]

__getattr__ = lazy_getattr(
    __name__,
    {},
    moved={
        "align_channels": "mcvi_ops.pp.align_channels",
        "clip_percentiles": "mcvi_ops.pp.clip_percentiles",
        "extract_crops": "mcvi_ops.pp.extract_crops",
    },
)
