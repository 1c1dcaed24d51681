"""Plots of evaluation metrics and embeddings.

Every function takes ``show``, ``save`` and ``ax`` (or ``axs``) and ``return_fig``, as in scanpy:
``save`` writes the finished figure once, and ``show=None`` shows it unless ``ax`` or
``return_fig`` is given.
"""

from ._comparison import method_comparison
from ._embedding import salient_background
from ._metrics import confusion_matrix, precision_recall, recall_difference, technical_covariates

__all__ = [
    "confusion_matrix",
    "method_comparison",
    "precision_recall",
    "recall_difference",
    "salient_background",
    "technical_covariates",
]
