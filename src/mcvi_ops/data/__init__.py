"""The crop store format, links between AnnData rows and crops, and scvi-tools fields.

Also the readers of microscope images and cell tables (``_images``, ``_tables``) that both
:mod:`mcvi_ops.pp` and :mod:`mcvi_ops.io` build on; they are public as
:func:`mcvi_ops.io.read_image` and :func:`mcvi_ops.io.read_cells`. The fields load scvi-tools on
first use; the store and links need only zarr and anndata.
"""

from mcvi_ops._lazy import lazy_getattr

from ._link import StoreChangedError, get_crops, link_crops, linked_store
from ._lock import StoreLockedError
from ._store import CropStore, IncompleteStoreError, open_crops
from ._writer import CropWriter, write_crops

__all__ = [
    "CropStore",
    "CropWriter",
    "ImageField",
    "IncompleteStoreError",
    "PerturbationField",
    "StoreChangedError",
    "StoreLockedError",
    "get_crops",
    "link_crops",
    "linked_store",
    "open_crops",
    "write_crops",
]

__getattr__ = lazy_getattr(
    __name__,
    {"ImageField": "._fields", "PerturbationField": "._fields"},
    moved={
        "BalancedChunkSampler": "mcvi_ops.dataloaders.BalancedChunkSampler",
        "CropDataLoader": "mcvi_ops.dataloaders.CropDataLoader",
        "CropDataSplitter": "mcvi_ops.dataloaders.CropDataSplitter",
        "CropDataset": "mcvi_ops.dataloaders.CropDataset",
        "synthetic_screen": "mcvi_ops.datasets.synthetic_screen",
    },
)
