"""Resizing and casting crops: shared by tile cropping and crop import."""

from __future__ import annotations

import numpy as np


def resize_crops(crops: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased resize of ``(n, C, h, w)`` crops to ``(n, C, size, size)`` as float32."""
    from skimage.transform import resize

    n, c, h, w = crops.shape
    if (h, w) == (size, size) or n == 0:
        return crops.astype(np.float32, copy=False)
    stacked = crops.reshape(n * c, h, w).transpose(1, 2, 0).astype(np.float32, copy=False)
    # the last axis keeps its length, so it is neither smoothed nor interpolated
    resized = resize(stacked, (size, size, n * c), order=1, anti_aliasing=True, preserve_range=True)
    return resized.transpose(2, 0, 1).reshape(n, c, size, size).astype(np.float32, copy=False)


def cast_crops(crops: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast pixels to the output dtype.

    Processed (float) pixels are rounded and saturated to an integer type: resampling rings a
    little past the input range. Integer pixels outside the target range raise: clipping them
    would silently change the data.
    """
    if crops.dtype == dtype:
        return crops
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if np.issubdtype(crops.dtype, np.floating):
            crops = np.rint(crops)
            np.maximum(crops, info.min, out=crops)
            np.minimum(crops, info.max, out=crops)
        elif crops.size and (int(crops.min()) < info.min or int(crops.max()) > info.max):
            msg = (
                f"{crops.dtype} pixels span [{crops.min()}, {crops.max()}], outside the {dtype} "
                f"range [{info.min}, {info.max}] of the crops. Pass dtype='float32', or enable "
                "clipping (clip_percentiles) to bring outliers into range."
            )
            raise ValueError(msg)
        return crops.astype(dtype)
    return crops.astype(dtype)
