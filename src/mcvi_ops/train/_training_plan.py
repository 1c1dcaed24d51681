"""The training plan of the image models: scvi-tools' TrainingPlan, safe under DDP."""

from __future__ import annotations

import torch
from scvi.module.base import LossOutput
from scvi.train import TrainingPlan


class ImageTrainingPlan(TrainingPlan):
    """scvi-tools' :class:`~scvi.train.TrainingPlan` whose metrics can be averaged across ranks.

    The parent computes and logs metrics under ``torch.inference_mode``; under DDP, Lightning later
    averages the logged tensors across ranks in place, which tensors made in inference mode
    refuse. This plan logs the same quantities (the ELBO metric and every extra metric of the
    module's :class:`~scvi.module.base.LossOutput`) under ``torch.no_grad`` instead.
    """

    @torch.no_grad()
    def compute_and_log_metrics(self, loss_output: LossOutput, metrics: dict, mode: str) -> None:
        """Update the ELBO metric of ``mode`` and log it with every extra metric of the loss."""
        n_obs = loss_output.n_obs_minibatch
        metrics[f"elbo_{mode}"].update(
            reconstruction_loss=loss_output.reconstruction_loss_sum,
            kl_local=loss_output.kl_local_sum,
            kl_global=loss_output.kl_global_sum,
            n_obs_minibatch=n_obs,
        )
        log_options = {
            "on_step": self.on_step,
            "on_epoch": self.on_epoch,
            "batch_size": n_obs,
            "sync_dist": self.use_sync_dist,
        }
        self.log_dict(metrics, **log_options)
        for key, value in loss_output.extra_metrics.items():
            if isinstance(value, torch.Tensor) and value.ndim == 0:
                self.log(f"{key}_{mode}", value.detach(), **log_options)
