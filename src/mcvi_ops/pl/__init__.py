"""Plots of evaluation metrics and embeddings."""

from ._embedding import salient_background
from ._metrics import confusion_matrix, precision_recall, recall_difference, technical_covariates

__all__ = [
    "confusion_matrix",
    "precision_recall",
    "recall_difference",
    "salient_background",
    "technical_covariates",
]
