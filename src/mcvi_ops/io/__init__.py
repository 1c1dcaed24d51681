"""Readers of outside formats: cell tables, images, crops made elsewhere, brieflow, scPortrait."""

from mcvi_ops._lazy import lazy_getattr
from mcvi_ops.data._images import MissingTileError, UnreadableImageError, read_image
from mcvi_ops.data._tables import read_cells

from ._brieflow import read_brieflow
from ._crop_folder import read_crop_folder
from ._from_crops import crops_from_array, crops_from_files
from ._scportrait import read_scportrait

__all__ = [
    "MissingTileError",
    "UnreadableImageError",
    "crops_from_array",
    "crops_from_files",
    "read_brieflow",
    "read_cells",
    "read_crop_folder",
    "read_image",
    "read_scportrait",
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
