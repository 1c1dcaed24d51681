"""Calibration candidate (issue 16): an MCVAE whose decoder also reconstructs CellProfiler features.

The encoders still read the crops only (cells to embed need no features); training adds the
Gaussian negative log-likelihood of each cell's standardised CellProfiler features, decoded from
``(z, s)`` and the batch by a small fully connected head, to the pixel term. An experiment of
the calibration study, kept here with its numbers in ``results/calibration.md``; not part of
the package.
"""

from __future__ import annotations

import numpy as np
import torch
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import ObsmField
from torch.distributions import Normal

from mcvi_ops import MCVAE
from mcvi_ops._constants import CONTROL_CODE, PERTURBATION_KEY
from mcvi_ops.model._feature_stats import control_statistics
from mcvi_ops.module import GaussianLikelihood, MultiContrastiveVAE
from mcvi_ops.module._decoding import decoder_input
from mcvi_ops.nn import MLPDecoder

AUXILIARY_KEY = "auxiliary_features"


class HybridModule(MultiContrastiveVAE):
    """:class:`MultiContrastiveVAE` plus a decoder head for standardised per-cell features."""

    def __init__(self, *args, n_auxiliary: int = 0, auxiliary_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        n_input = self.n_salient_latent + self.n_background_latent + self.n_batch
        self.auxiliary_weight = float(auxiliary_weight)
        self.auxiliary_decoder = MLPDecoder(n_input, n_auxiliary, n_hidden=256)
        self.auxiliary_likelihood = GaussianLikelihood(
            (n_auxiliary,), scale_init=1.0, min_scale=0.05
        )
        rows = max(self.n_batch, 1)
        self.register_buffer("auxiliary_center", torch.zeros(rows, n_auxiliary))
        self.register_buffer("auxiliary_scale", torch.ones(rows, n_auxiliary))
        self.register_buffer("auxiliary_mask", torch.ones(n_auxiliary, dtype=torch.bool))

    def _auxiliary_target(self, tensors):
        x = tensors[AUXILIARY_KEY].float()
        batch = tensors.get(REGISTRY_KEYS.BATCH_KEY)
        rows = (
            torch.zeros(len(x), dtype=torch.long, device=x.device)
            if batch is None or self.n_batch == 0
            else batch.reshape(-1).long()
        )
        y = (x - self.auxiliary_center[rows]) / self.auxiliary_scale[rows]
        y = torch.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0).clamp(-10.0, 10.0)
        return y * self.auxiliary_mask.to(y.dtype)

    def loss(self, tensors, inference_outputs, generative_outputs, kl_weight: float = 1.0):
        pixels = self._reconstruction_loss(
            generative_outputs["px"], inference_outputs["x_transformed"]
        )
        latent = decoder_input(
            [inference_outputs["z"], inference_outputs["s"]],
            tensors.get(REGISTRY_KEYS.BATCH_KEY),
            self.n_batch,
        )
        mean = self.auxiliary_decoder(latent).float()
        scale = self.auxiliary_likelihood.scale.to(mean.dtype).expand_as(mean)
        target = self._auxiliary_target(tensors)
        mask = self.auxiliary_mask.to(mean.dtype)
        features = -(Normal(mean, scale).log_prob(target) * mask).sum(-1)
        metrics = {**self._likelihood_metrics(), "auxiliary_nll": features.mean().detach()}
        return self._contrastive_loss(
            tensors,
            inference_outputs,
            pixels + self.auxiliary_weight * features,
            kl_weight,
            extra_metrics=metrics,
        )


class HybridMCVAE(MCVAE):
    """MCVAE trained to reconstruct each cell's features (``.obsm[auxiliary_key]``) too."""

    _module_cls = HybridModule

    @classmethod
    def setup_anndata(
        cls,
        adata,
        perturbation_key: str,
        control_category: str = "nontargeting",
        *,
        batch_key: str | None = None,
        intensity_factor_key: str | None = None,
        auxiliary_key: str = "cellprofiler_features",
        **kwargs,
    ) -> None:
        setup_method_args = cls._get_setup_method_args(**locals())
        fields = cls._image_fields(
            adata, perturbation_key, control_category, batch_key, intensity_factor_key
        )
        fields.append(ObsmField(AUXILIARY_KEY, auxiliary_key))
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    def __init__(self, adata, *, auxiliary_weight: float = 1.0, **kwargs) -> None:
        features = np.asarray(adata.obsm[self._setup_args(adata)["auxiliary_key"]])
        super().__init__(
            adata, n_auxiliary=features.shape[1], auxiliary_weight=auxiliary_weight, **kwargs
        )
        manager = self.adata_manager
        batch = (
            np.asarray(manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY)).reshape(-1)
            if REGISTRY_KEYS.BATCH_KEY in manager.data_registry
            else None
        )
        control = (
            np.asarray(manager.get_from_registry(PERTURBATION_KEY)).reshape(-1) == CONTROL_CODE
        )
        stats = control_statistics(
            features,
            control,
            batch,
            self.module.n_batch,
            feature_names=[str(i) for i in range(features.shape[1])],
        )
        with torch.no_grad():
            self.module.auxiliary_center.copy_(torch.as_tensor(stats.center))
            self.module.auxiliary_scale.copy_(torch.as_tensor(stats.scale))
            self.module.auxiliary_mask.copy_(torch.as_tensor(stats.kept))

    @classmethod
    def _setup_args(cls, adata) -> dict:
        return cls._get_most_recent_anndata_manager(adata, required=True).registry["setup_args"]
