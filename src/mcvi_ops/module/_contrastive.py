"""The multi-contrastive objective, shared by the image and the feature-table modules.

Everything that does not depend on what a cell is measured as lives here: the per-perturbation
prior means, the handling of control cells (``s = 0``, no KL on ``s``, a Wasserstein penalty),
the linear read-out of the perturbation from the latents, and the loss that combines them with
the module's own reconstruction term. A module class mixes it in beside its data-specific base
(encoders, decoder, likelihood, input transform).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from scvi.module import Classifier
from scvi.module.base import LossOutput, auto_move_data
from torch import nn
from torch.distributions import Normal, kl_divergence

from mcvi_ops._constants import CONTROL_CODE, PERTURBATION_KEY

PriorKind = Literal["both", "salient", "background", "none"]
ClassifierInput = Literal["salient", "both"]


def is_control(perturbation: torch.Tensor) -> torch.Tensor:
    """Boolean mask of control cells, shape (B,), from perturbation codes of shape (B,) or (B, 1)."""
    return perturbation.reshape(-1) == CONTROL_CODE


def zero_controls(s: torch.Tensor, perturbation: torch.Tensor) -> torch.Tensor:
    """``s`` (..., B, D) with the rows of control cells set to 0, from codes of shape (B,) or (B, 1).

    Controls have no salient variation: their ``s`` is exactly 0 wherever it is decoded.
    """
    perturbed = ~is_control(perturbation.to(s.device))
    return s * perturbed.unsqueeze(-1).to(s.dtype)


class MultiContrastiveMixin:
    """Latents, priors, penalties and loss of the multi-contrastive modules.

    The module that mixes this in owns ``background_encoder`` and ``salient_encoder`` (inputs to
    :class:`torch.distributions.Normal` posteriors), implements ``_decode(latents, **covariates)``
    (returning the likelihood ``"px"`` and its mean ``"px_mean"``) and
    ``_decoder_covariates(tensors)`` (the keyword arguments of ``_decode`` besides the latents,
    e.g. ``batch_index``), and calls ``_init_contrastive`` in its ``__init__``.
    """

    background_encoder: nn.Module
    salient_encoder: nn.Module

    def _init_contrastive(
        self,
        n_perturbations: int,
        *,
        n_salient_latent: int,
        n_background_latent: int,
        prior: PriorKind,
        wasserstein_penalty: float,
        classification_weight: float,
        classifier_input: ClassifierInput,
    ) -> None:
        if prior not in ("both", "salient", "background", "none"):
            msg = (
                f"`prior` must be one of 'both', 'salient', 'background' or 'none', got {prior!r}."
            )
            raise ValueError(msg)
        if classifier_input not in ("salient", "both"):
            msg = f"`classifier_input` must be 'salient' or 'both', got {classifier_input!r}."
            raise ValueError(msg)
        for name, value in (
            ("wasserstein_penalty", wasserstein_penalty),
            ("classification_weight", classification_weight),
        ):
            if not (isinstance(value, int | float) and value >= 0):
                msg = f"`{name}` must be a number >= 0, got {value!r}."
                raise ValueError(msg)
        self.n_perturbations = n_perturbations
        self.n_salient_latent = n_salient_latent
        self.n_background_latent = n_background_latent
        self.prior = prior
        self.wasserstein_penalty = float(wasserstein_penalty)
        self.classification_weight = float(classification_weight)
        self.classifier_input = classifier_input
        # learned prior means; the control row is masked to 0 (see `prior_means`)
        self.background_prior_mean = (
            nn.Embedding(n_perturbations, n_background_latent)
            if prior in ("both", "background")
            else None
        )
        self.salient_prior_mean = (
            nn.Embedding(n_perturbations, n_salient_latent)
            if prior in ("both", "salient")
            else None
        )
        for table in (self.background_prior_mean, self.salient_prior_mean):
            if table is not None:
                nn.init.zeros_(table.weight)

        # linear read-outs of every cell's perturbation (controls included) from its posterior
        # means: weak supervision with the labels every screen has. One reads s; with
        # classifier_input="both" a second, separate one reads z
        def read_out(n_input: int) -> Classifier | None:
            if classification_weight <= 0:
                return None
            return Classifier(
                n_input, n_hidden=0, n_labels=n_perturbations, n_layers=0, logits=True
            )

        self.classifier = read_out(n_salient_latent)
        self.background_classifier = (
            read_out(n_background_latent) if classifier_input == "both" else None
        )

    # --- priors ---------------------------------------------------------------------------
    def prior_means(self, perturbation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prior means of ``z`` and ``s`` for perturbation codes of shape (B,) or (B, 1)."""
        codes = perturbation.reshape(-1).long()
        perturbed = (~is_control(codes)).unsqueeze(-1).float()
        device = codes.device
        mean_z = (
            self.background_prior_mean(codes) * perturbed
            if self.background_prior_mean is not None
            else torch.zeros((codes.shape[0], self.n_background_latent), device=device)
        )
        mean_s = (
            self.salient_prior_mean(codes) * perturbed
            if self.salient_prior_mean is not None
            else torch.zeros((codes.shape[0], self.n_salient_latent), device=device)
        )
        return mean_z, mean_s

    # --- inference and generation ---------------------------------------------------------
    def _encode(
        self, x: torch.Tensor, perturbation: torch.Tensor, n_samples: int = 1
    ) -> dict[str, torch.Tensor | Normal]:
        """Posteriors and draws of ``z`` and ``s``; ``s`` of control cells is exactly 0."""
        qz = self.background_encoder(x)
        qs = self.salient_encoder(x)
        shape = (n_samples,) if n_samples > 1 else ()
        z, s = qz.rsample(shape), qs.rsample(shape)
        return {"qz": qz, "qs": qs, "z": z, "s": zero_controls(s, perturbation)}

    def _get_generative_input(
        self, tensors: dict[str, torch.Tensor], inference_outputs: dict
    ) -> dict[str, torch.Tensor | None]:
        return {
            "z": inference_outputs["z"],
            "s": inference_outputs["s"],
            **self._decoder_covariates(tensors),
        }

    @auto_move_data
    def generative(
        self,
        z: torch.Tensor,
        s: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        **covariates: torch.Tensor | None,
    ) -> dict[str, torch.Tensor | Normal]:
        """The likelihood of the (transformed) input given ``z``, ``s`` and the covariates."""
        return self._decode([z, s], batch_index, **covariates)

    @torch.inference_mode()
    def reconstruct(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decode posterior means (controls with ``s = 0``), on the model's input scale."""
        out = self.inference(**self._get_inference_input(tensors))
        s = zero_controls(out["qs"].loc, tensors[PERTURBATION_KEY])
        return self.generative(out["qz"].loc, s, **self._decoder_covariates(tensors))["px_mean"]

    @torch.inference_mode()
    def sample(
        self,
        perturbation: torch.Tensor,
        *,
        n_samples: int = 1,
        batch_index: torch.Tensor | None = None,
        use_prior_mean: bool = False,
        **covariates: torch.Tensor | None,
    ) -> torch.Tensor:
        """Decode draws from the prior of each given perturbation, on the model's input scale.

        Returns a tensor of shape (n_samples, B, ...), one input per perturbation and draw.
        """
        mean_z, mean_s = self.prior_means(perturbation.to(self.device))
        if use_prior_mean:
            z = mean_z.expand(n_samples, *mean_z.shape)
            s = mean_s.expand(n_samples, *mean_s.shape)
        else:
            z = Normal(mean_z, 1.0).sample((n_samples,))
            s = Normal(mean_s, 1.0).sample((n_samples,))
        s = zero_controls(s, perturbation)
        return self.generative(z, s, batch_index, **covariates)["px_mean"]

    # --- loss -----------------------------------------------------------------------------
    def _contrastive_loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict,
        reconstruction: torch.Tensor,
        kl_weight: float,
        extra_metrics: dict[str, torch.Tensor] | None = None,
    ) -> LossOutput:
        """The loss of a minibatch from the module's reconstruction term of each cell (B,).

        Per cell: ``reconstruction`` plus the KL terms (times the warm-up weight), the
        Wasserstein penalty on controls' salient posterior and the weighted cross-entropy of the
        perturbation read-out; averaged over the minibatch.
        """
        qz, qs = inference_outputs["qz"], inference_outputs["qs"]
        perturbation = tensors[PERTURBATION_KEY].reshape(-1)
        control = is_control(perturbation).float()
        mean_z, mean_s = self.prior_means(perturbation)
        kl_z = kl_divergence(qz, Normal(mean_z, torch.ones_like(mean_z))).sum(-1)
        kl_s = kl_divergence(qs, Normal(mean_s, torch.ones_like(mean_s))).sum(-1)
        kl_s = kl_s * (1.0 - control)
        wasserstein = (qs.loc.pow(2) + qs.scale.pow(2)).sum(-1) * control
        per_cell = reconstruction + kl_weight * (kl_z + kl_s)
        per_cell = per_cell + self.wasserstein_penalty * wasserstein
        extra = {
            "wasserstein_control": wasserstein.sum() / control.sum().clamp(min=1.0),
            **(extra_metrics or {}),
        }
        heads = (("", self.classifier, qs), ("background_", self.background_classifier, qz))
        for prefix, head, posterior in heads:
            if head is None:
                continue
            cross_entropy, accuracy = self._read_out(head, posterior.loc, perturbation, control)
            per_cell = per_cell + self.classification_weight * cross_entropy
            extra[f"{prefix}classification_loss"] = cross_entropy.mean().detach()
            extra[f"{prefix}classification_accuracy"] = accuracy
        return LossOutput(
            loss=torch.mean(per_cell),
            reconstruction_loss=reconstruction,
            kl_local={"kl_background": kl_z, "kl_salient": kl_s},
            extra_metrics=extra,
        )

    @staticmethod
    def _read_out(
        head: nn.Module, means: torch.Tensor, perturbation: torch.Tensor, control: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of each cell's perturbation (B,) and the accuracy on perturbed cells."""
        logits = head(means).float()
        labels = perturbation.long()
        cross_entropy = F.cross_entropy(logits, labels, reduction="none")
        hits = (logits.argmax(-1) == labels)[control < 0.5].float()
        accuracy = hits.mean() if hits.numel() else torch.zeros((), device=logits.device)
        return cross_entropy, accuracy.detach()
