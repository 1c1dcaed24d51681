"""Checks of the crops a loader hands out: NaN/inf pixels, with the cells named.

Training (:class:`~mcvi_ops.train.CheckInputs`), the models' outputs
(:class:`~mcvi_ops.dataloaders.InferenceLoader`) and the input scaling fitted on control crops
all raise the same :class:`NonFiniteCropsError` from here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scvi import REGISTRY_KEYS

from mcvi_ops._constants import CROP_INDEX_KEY


class NonFiniteCropsError(ValueError):
    """Crops hold NaN or infinite pixel values, which no model can learn from."""


def describe_cells(
    bad_crops: Sequence[int], obs_names: Sequence[str], crop_indices: np.ndarray, *, limit: int = 5
) -> str:
    """``'cell_3' (crop 3), ... and N more`` for crop indices, naming the AnnData rows."""
    bad_crops = np.unique(np.asarray(bad_crops, dtype=np.int64))
    rows = np.flatnonzero(np.isin(crop_indices, bad_crops))
    shown = [f"{str(obs_names[r])!r} (crop {int(crop_indices[r])})" for r in rows[:limit]]
    if not shown:  # crops not linked from these rows
        shown = [f"crop {int(c)}" for c in bad_crops[:limit]]
    more = max(len(rows), len(bad_crops)) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def nonfinite_crops_message(where: str, cells: str, n_cells: int) -> str:
    """The error of crops with NaN/inf pixels: which cells, and how to fix it."""
    return (
        f"{n_cells} crop(s) {where} hold NaN or infinite pixel values: {cells}. The model cannot "
        "learn from or embed them. Drop these cells (`adata = adata[~adata.obs_names.isin(bad)]"
        ".copy()`, then set up again), or rewrite the crops with "
        "`mcvi_ops.data.write_crops(..., nonfinite='zero')` to set such pixels to 0."
    )


def check_finite_crops(
    crops: np.ndarray,
    crop_of_each: np.ndarray,
    where: str,
    obs_names: Sequence[str],
    crop_indices: np.ndarray,
) -> None:
    """Raise :class:`NonFiniteCropsError` naming the cells whose crops hold NaN/inf pixels.

    Parameters
    ----------
    crops
        Crops ``(n, C, H, W)`` as read from the store.
    crop_of_each
        The crop index of each of ``crops``.
    where
        Where the crops come from, for the message (``"of a training minibatch"``).
    obs_names, crop_indices
        Names and crop indices of all AnnData rows, to name the rows of bad crops.
    """
    if crops.dtype.kind != "f":
        return  # integer crops (uint8, uint16 stores) are always finite
    finite = np.isfinite(crops.reshape(len(crops), -1)).all(axis=1)
    if finite.all():
        return
    bad = np.asarray(crop_of_each).reshape(-1)[~finite]
    cells = describe_cells(bad, obs_names, crop_indices)
    raise NonFiniteCropsError(nonfinite_crops_message(where, cells, len(bad)))


def check_finite_batch(
    batch: dict[str, torch.Tensor], where: str, obs_names: np.ndarray, crop_indices: np.ndarray
) -> None:
    """Raise :class:`NonFiniteCropsError` naming the cells of ``batch`` with NaN/inf pixels."""
    x = batch[REGISTRY_KEYS.X_KEY]
    if not x.is_floating_point():
        return  # integer crops (uint8, uint16 stores) are always finite
    finite = torch.isfinite(x).flatten(1).all(dim=1)
    if bool(finite.all()):
        return
    bad = batch[CROP_INDEX_KEY].reshape(-1)[~finite].cpu().numpy()
    cells = describe_cells(bad, obs_names, crop_indices)
    raise NonFiniteCropsError(nonfinite_crops_message(where, cells, len(bad)))
