"""Segmentation of the nucleus and the cell in one crop, for the CellProfiler measurements."""

from __future__ import annotations

import numpy as np


def segment_nuclei(dna: np.ndarray) -> np.ndarray:
    """Otsu threshold of the smoothed nuclear channel, declumped by shape, specks removed."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    smooth = ndi.gaussian_filter(dna, 1.0)
    if np.ptp(smooth) <= 0:
        return np.zeros(dna.shape, dtype=np.int64)
    foreground = ndi.binary_fill_holes(smooth > threshold_otsu(smooth))
    # touching nuclei: one marker per peak of the distance to the background, peaks at least
    # a tenth of the crop apart (crops are a few nuclei wide)
    distance = ndi.gaussian_filter(ndi.distance_transform_edt(foreground), 1.0)
    window = max(7, min(dna.shape) // 10)
    peaks = (distance == ndi.maximum_filter(distance, size=window)) & (distance > 1)
    labels = watershed(-distance, ndi.label(peaks)[0], mask=foreground)
    large = np.bincount(labels.ravel()) >= max(4, dna.size // 400)
    large[0] = False
    return np.where(large[labels], labels, 0).astype(np.int64)


def central_label(labels: np.ndarray) -> int:
    """The label at the crop centre, or of the labelled pixel nearest to it (0 if none)."""
    from scipy import ndimage as ndi

    centre = (labels.shape[0] // 2, labels.shape[1] // 2)
    if labels[centre] > 0:
        return int(labels[centre])
    if not (labels > 0).any():
        return 0
    _, (rows, cols) = ndi.distance_transform_edt(labels == 0, return_indices=True)
    return int(labels[rows[centre], cols[centre]])


def segment_cell(pixels, cell_channels, nuclei_labels, chosen: int) -> np.ndarray:
    """CellProfiler's "Distance - B": each foreground pixel goes to its nearest nucleus."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_li
    from skimage.segmentation import watershed

    nucleus = nuclei_labels == chosen
    if not cell_channels:
        return nucleus
    # channels are on the store's scale, so a channel without signal in this crop adds little
    body = sum(ndi.gaussian_filter(pixels[c], 2.0) for c in cell_channels)
    if np.ptp(body) <= 0:
        return nucleus
    body = np.log(np.maximum(body, 0.0) + 1e-3)  # dim cytoplasm next to bright cells
    foreground = ndi.binary_fill_holes((body > threshold_li(body)) | (nuclei_labels > 0))
    distance = ndi.distance_transform_edt(nuclei_labels == 0)
    regions = watershed(distance, markers=nuclei_labels, mask=foreground)
    return ndi.binary_fill_holes((regions == chosen) | nucleus)


# --- measurement -----------------------------------------------------------------------------
