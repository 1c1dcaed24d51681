"""The training plan of the image models: scvi-tools' TrainingPlan, safe under DDP."""

from __future__ import annotations

import torch
from scvi.train import TrainingPlan


class ImageTrainingPlan(TrainingPlan):
    """scvi-tools' :class:`~scvi.train.TrainingPlan` with metrics logged under ``no_grad``.

    The parent logs metrics under ``torch.inference_mode``; under DDP Lightning later averages
    those tensors across ranks in place, which tensors made in inference mode refuse. Logging
    under ``no_grad`` keeps the same numbers and lets the all-reduce run.
    """

    @torch.no_grad()
    def compute_and_log_metrics(self, loss_output, metrics, mode) -> None:
        """Update the ELBO metrics and log every loss term (see the parent class)."""
        TrainingPlan.compute_and_log_metrics.__wrapped__(self, loss_output, metrics, mode)
