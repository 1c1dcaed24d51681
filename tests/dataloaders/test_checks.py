from __future__ import annotations

import numpy as np
import pytest
import torch
from scvi import REGISTRY_KEYS

import mcvi_ops.train
from mcvi_ops._constants import CROP_INDEX_KEY
from mcvi_ops.dataloaders._checks import (
    NonFiniteCropsError,
    check_finite_batch,
    check_finite_crops,
    describe_cells,
)


def test_describe_cells_names_rows_and_crops():
    names = np.array([f"cell_{i}" for i in range(10)])
    crop_indices = np.arange(10)[::-1]  # row i holds crop 9 - i
    text = describe_cells([9, 0], names, crop_indices)
    assert text == "'cell_0' (crop 9), 'cell_9' (crop 0)"
    many = describe_cells(np.arange(8), names, crop_indices, limit=3)
    assert many.endswith("and 5 more")


def test_numpy_and_torch_checks_name_the_same_cells():
    names = np.array([f"cell_{i}" for i in range(6)])
    crop_indices = np.arange(6)
    crops = np.zeros((3, 1, 2, 2), dtype=np.float32)
    crops[1, 0, 0, 0] = np.nan
    crops[2, 0, 1, 1] = np.inf
    rows = np.array([0, 4, 5])
    with pytest.raises(NonFiniteCropsError, match=r"2 crop\(s\) here hold NaN.*'cell_4'.*'cell_5'"):
        check_finite_crops(crops, rows, "here", names, crop_indices)
    batch = {
        REGISTRY_KEYS.X_KEY: torch.as_tensor(crops),
        CROP_INDEX_KEY: torch.as_tensor(rows).reshape(-1, 1),
    }
    with pytest.raises(NonFiniteCropsError, match=r"2 crop\(s\) here hold NaN.*'cell_4'.*'cell_5'"):
        check_finite_batch(batch, "here", names, crop_indices)
    check_finite_crops(crops.astype(np.uint16), rows, "here", names, crop_indices)  # integers
    assert mcvi_ops.train.NonFiniteCropsError is NonFiniteCropsError  # one class, two names
