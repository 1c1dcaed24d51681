"""Keys of the minibatch dictionaries shared by data loaders and modules."""

from __future__ import annotations

X_KEY = "X"
IMAGE_KEY = "crops"
PERTURBATION_KEY = "perturbation"
BATCH_KEY = "batch"
CONTROL_CODE = 0
