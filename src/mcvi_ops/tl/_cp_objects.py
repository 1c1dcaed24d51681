"""The objects measured in each crop: the central nucleus and its cell, from masks or segmentation.

Masks given as channels must be object labels (0 background, 1, 2, ...): a float channel with
fractional or negative values is an intensity image, and rounding it would measure made-up
objects, so it is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._segment import central_label, segment_cell, segment_nuclei

if TYPE_CHECKING:
    from mcvi_ops.data import CropStore

    from ._cellprofiler import _Config


def _not_labels(values: np.ndarray) -> bool:
    """Whether float values cannot be object labels (fractions or negative numbers)."""
    return bool((values < 0).any() or not np.array_equal(values, np.rint(values)))


def _label_error(name: str, role: str) -> str:
    return (
        f"Mask channel {name!r} ({role}) holds fractional or negative values: it is an intensity "
        "image, not object labels (0 background, 1, 2, ... one number per object), and rounding "
        "it would measure made-up objects. Pass `masks=` naming a label channel (or a "
        "`label_store` of labels), or masks='segment' to segment the cells."
    )


def check_label_channel(source: CropStore, channel: int, name: str, role: str) -> None:
    """Refuse a float mask channel that is not labels, judged on the store's first chunk."""
    if source.dtype.kind != "f" or source.n_cells == 0:
        return
    values = source.read_chunk(0)[:, channel]
    if _not_labels(values[np.isfinite(values)]):
        raise ValueError(_label_error(name, role))


def objects(pixels, crop, label_crop, config: _Config) -> tuple[np.ndarray, np.ndarray]:
    """The central cell's nucleus and cell masks in one crop."""

    def label_image(source: tuple[str, int]) -> np.ndarray:
        image = (crop if source[0] == "image" else label_crop)[source[1]]
        if image.dtype.kind == "f":
            if _not_labels(image[np.isfinite(image)]):  # crops past the checked first chunk
                raise ValueError(_label_error(f"{source[0]} channel {source[1]}", "mask"))
            return np.nan_to_num(image).astype(np.int64)
        return image.astype(np.int64)

    if config.nuclei_mask is None:
        nuclei_labels = segment_nuclei(pixels[config.nucleus_channel])
    else:
        nuclei_labels = label_image(config.nuclei_mask)
    chosen = central_label(nuclei_labels)
    nucleus = nuclei_labels == chosen if chosen else np.zeros(nuclei_labels.shape, dtype=bool)
    if config.cells_mask is not None:
        cell_labels = label_image(config.cells_mask)
        overlap = cell_labels[nucleus]
        overlap = overlap[overlap > 0]
        cell_id = np.bincount(overlap).argmax() if overlap.size else central_label(cell_labels)
        cell = cell_labels == cell_id if cell_id else np.zeros_like(nucleus)
    elif not chosen:
        cell = np.zeros_like(nucleus)
    else:
        cell = segment_cell(pixels, config.cell_channels, nuclei_labels, chosen)
    return nucleus, cell
