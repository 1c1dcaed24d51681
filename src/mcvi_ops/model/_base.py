"""Shared machinery of the image models: set-up, data loading, training defaults, inference."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin, VAEMixin
from scvi.utils import setup_anndata_dsp

from mcvi_ops._constants import CONTROL_CODE, IMAGE_KEY, PERTURBATION_KEY
from mcvi_ops.data._fields import ImageField, PerturbationField
from mcvi_ops.data._link import UNS_KEY, crop_reference, linked_store
from mcvi_ops.dataloaders import CropDataLoader, CropDataSplitter
from mcvi_ops.train import ImageTrainingPlan

logger = logging.getLogger(__name__)

#: cells seen (summed over epochs) that the default number of epochs aims for
_TARGET_CELLS_SEEN = 100_000


def default_max_epochs(n_cells: int) -> int:
    """Default number of epochs: ``ceil(100,000 / n_cells)``, between 2 and 40 epochs.

    Large screens need few passes (the paper trained 2 epochs of 31M cells); small ones more.
    """
    return int(np.clip(math.ceil(_TARGET_CELLS_SEEN / max(n_cells, 1)), 2, 40))


class BaseImageModel(VAEMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """Base class of models on image crops linked to AnnData rows (not used directly)."""

    _data_loader_cls = CropDataLoader
    _data_splitter_cls = CropDataSplitter
    _training_plan_cls = ImageTrainingPlan
    _balanced_training = True

    # --- set-up ---------------------------------------------------------------------------
    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: AnnData,
        perturbation_key: str,
        control_category: str = "nontargeting",
        *,
        batch_key: str | None = None,
        uns_key: str = UNS_KEY,
        **kwargs,
    ) -> None:
        """Register the crops, the perturbations and an optional batch covariate.

        Parameters
        ----------
        adata
            Cells linked to their crops with :func:`~mcvi_ops.data.link_crops`.
        perturbation_key
            Column of ``adata.obs`` naming each cell's perturbation (gene or guide).
        control_category
            The category of control cells; it always gets code 0.
        batch_key
            Optional column of a technical batch (e.g. plate and well), fed to the decoder only.
        uns_key
            Key of the crop-store reference in ``adata.uns``.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        reference = crop_reference(adata, uns_key=uns_key)
        fields = [
            ImageField(IMAGE_KEY, index_key=reference["index_key"], uns_key=uns_key),
            PerturbationField(
                PERTURBATION_KEY, perturbation_key, control_category=control_category
            ),
        ]
        if batch_key is not None:
            if batch_key not in adata.obs:
                msg = (
                    f"Batch column {batch_key!r} not found in adata.obs. Pass an existing column "
                    "(e.g. one combining plate and well) or `batch_key=None`."
                )
                raise KeyError(msg)
            fields.append(CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key))
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    def _image_layout(self) -> tuple[int, tuple[int, int], int, int]:
        stats = self.summary_stats
        n_batch = (
            int(stats.get("n_batch", 0))
            if REGISTRY_KEYS.BATCH_KEY in self.adata_manager.data_registry
            else 0
        )
        return (
            int(stats["n_channels"]),
            (int(stats["crop_height"]), int(stats["crop_width"])),
            int(stats["n_perturbation"]),
            n_batch,
        )

    def _fit_input_transform(self, *, max_cells: int = 2_000, seed: int = 0) -> None:
        """Fit the arcsinh/scaling statistics of the module's input transform on control cells."""
        controls = np.flatnonzero(self._is_control_cell())
        rng = np.random.default_rng(seed)
        if len(controls) > max_cells:
            controls = np.sort(rng.choice(controls, max_cells, replace=False))
        crop_index = self.adata_manager.get_from_registry(IMAGE_KEY).reshape(-1)
        store = linked_store(self.adata, uns_key=self._uns_key())
        self.module.transform.fit(store.take(crop_index[controls]))

    def _is_control_cell(self) -> np.ndarray:
        """Boolean mask of the registered cells that are controls."""
        codes = self.adata_manager.get_from_registry(PERTURBATION_KEY)
        return np.asarray(codes).reshape(-1) == CONTROL_CODE

    def _uns_key(self) -> str:
        return self.adata_manager.registry["setup_args"].get("uns_key", UNS_KEY)

    # --- data loading ---------------------------------------------------------------------
    def _validate_anndata(
        self, adata: AnnData | None = None, copy_if_view: bool = True, **kwargs
    ) -> AnnData:
        if (
            adata is not None
            and self.get_anndata_manager(adata) is None
            and self.adata_manager is not None
        ):
            # query data may hold perturbations the model never saw; encoders do not need them
            if adata.is_view:
                adata = adata.copy() if copy_if_view else adata
            self._register_manager_for_instance(
                self.adata_manager.transfer_fields(adata, extend_categories=True)
            )
            return adata
        return super()._validate_anndata(adata, copy_if_view=copy_if_view)

    # --- training -------------------------------------------------------------------------
    def train(
        self,
        max_epochs: int | None = None,
        *,
        batch_size: int = 128,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        early_stopping: bool = True,
        early_stopping_patience: int = 5,
        n_epochs_kl_warmup: int | None = None,
        n_steps_kl_warmup: int | None = None,
        gradient_clip_val: float | None = 10.0,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        precision: str | int | None = None,
        train_size: float = 0.9,
        validation_size: float | None = None,
        num_workers: int = 0,
        window_chunks: int = 8,
        datasplitter_kwargs: dict | None = None,
        plan_kwargs: dict | None = None,
        **trainer_kwargs: Any,
    ):
        """Train the model on balanced minibatches read chunk-wise from the crop store.

        Parameters
        ----------
        max_epochs
            Passes over the perturbed cells. Default: ``ceil(100,000 / n_cells)`` between 2 and
            40 (:func:`~mcvi_ops.model.default_max_epochs`): 10 epochs for 10k cells, 2 for
            screens of 50k cells and more.
        batch_size
            Cells per minibatch, half controls and half perturbed cells (must be even).
        lr
            Adam learning rate. 3e-3 learned fastest on a CPU budget in our comparison of 1e-4
            (the paper's, too slow for a few epochs), 1e-3 and 3e-3 (``benchmarks/RESULTS.md``).
        weight_decay
            Adam weight decay.
        early_stopping
            Stop when the validation loss has not improved for ``early_stopping_patience`` epochs
            (disabled under DDP by scvi-tools).
        early_stopping_patience
            Epochs without improvement before stopping.
        n_epochs_kl_warmup
            Epochs over which the KL weight grows linearly from 0 to 1, instead of steps.
        n_steps_kl_warmup
            Minibatches over which the KL weight grows from 0 to 1. Default: a third of all
            training steps.
        gradient_clip_val
            Clip the gradient norm to this value (`None`: no clipping).
        accelerator
            ``"auto"``, ``"cpu"``, ``"gpu"``, ...
        devices
            Devices to use; with ``strategy="ddp"`` each rank trains on its own shard of both
            control and perturbed cells.
        precision
            Lightning precision, e.g. ``"bf16-mixed"`` on recent GPUs.
        train_size
            Fraction of cells (controls and perturbed alike) used for training.
        validation_size
            Fraction used for validation (default: the rest).
        num_workers
            Data-loader worker processes.
        window_chunks
            Store chunks shuffled together; larger mixes better, smaller reads more sequentially.
        datasplitter_kwargs
            More arguments of :class:`~mcvi_ops.dataloaders.CropDataSplitter`.
        plan_kwargs
            More arguments of :class:`scvi.train.TrainingPlan`.
        **trainer_kwargs
            More arguments of :class:`scvi.train.Trainer` / :class:`lightning.pytorch.Trainer`
            (e.g. ``strategy="ddp"``).

        Returns
        -------
        Nothing; training curves are in ``model.history``.
        """
        if batch_size < 2 or (self._balanced_training and batch_size % 2):
            msg = (
                f"`batch_size` must be an even number >= 2 (half controls, half perturbed cells), "
                f"got {batch_size}."
            )
            raise ValueError(msg)
        if max_epochs is None:
            max_epochs = default_max_epochs(self.adata.n_obs)
        if n_epochs_kl_warmup is None and n_steps_kl_warmup is None:
            # warm up over the first third of all steps (per step, so 1-2 epoch runs on big
            # screens warm up smoothly instead of jumping from 0 to 1 at an epoch boundary)
            n_steps_kl_warmup = max(
                1, self._steps_per_epoch(batch_size, train_size) * max_epochs // 3
            )
        plan = {
            "lr": lr,
            "weight_decay": weight_decay,
            "n_epochs_kl_warmup": n_epochs_kl_warmup,
            "n_steps_kl_warmup": n_steps_kl_warmup,
            **(plan_kwargs or {}),
        }
        splitter = {
            "balanced": self._balanced_training,
            "num_workers": num_workers,
            "window_chunks": window_chunks,
            **(datasplitter_kwargs or {}),
        }
        trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        trainer_kwargs.setdefault("early_stopping_monitor", "validation_loss")
        trainer_kwargs.setdefault("early_stopping_patience", early_stopping_patience)
        # our batch sampler shards per rank itself; Lightning must not replace it
        trainer_kwargs.setdefault("use_distributed_sampler", False)
        if gradient_clip_val is not None:
            trainer_kwargs.setdefault("gradient_clip_val", gradient_clip_val)
        if precision is not None:
            trainer_kwargs["precision"] = precision
        return super().train(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            train_size=train_size,
            validation_size=validation_size,
            batch_size=batch_size,
            early_stopping=early_stopping,
            datasplitter_kwargs=splitter,
            plan_kwargs=plan,
            **trainer_kwargs,
        )

    def _steps_per_epoch(self, batch_size: int, train_size: float) -> int:
        control = self._is_control_cell()
        if self._balanced_training:
            n_cells, per_batch = int((~control).sum()), batch_size // 2
        else:
            n_cells, per_batch = len(control), batch_size
        return max(1, math.ceil(n_cells * train_size / per_batch))

    # --- outputs shared by the image models -----------------------------------------------
    @torch.inference_mode()
    def get_reconstruction(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        batch_size: int | None = None,
        inverse_transform: bool = False,
    ) -> np.ndarray:
        """Reconstructions of crops from their posterior means (MCVAE: controls with ``s = 0``).

        Parameters
        ----------
        adata
            AnnData with crops of the same channels and size (default: the training data).
        indices
            Rows of ``adata`` (default: all).
        batch_size
            Cells per minibatch.
        inverse_transform
            Return raw-intensity images instead of the model's [-1, 1] scale.

        Returns
        -------
        Images of shape (n_cells, n_channels, height, width).
        """
        self.module.eval()
        images = [
            self._to_images(self.module.reconstruct(tensors), inverse_transform)
            for tensors in self._iterate(adata, indices, batch_size)
        ]
        return np.concatenate(images)

    # --- inference helpers ----------------------------------------------------------------
    def _iterate(
        self, adata: AnnData | None, indices: Sequence[int] | None, batch_size: int | None
    ) -> Iterator[dict[str, torch.Tensor]]:
        self._check_if_trained(warn=True)
        adata = self._validate_anndata(adata)
        yield from self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)

    def _to_images(self, transformed: torch.Tensor, inverse_transform: bool) -> np.ndarray:
        out = self.module.transform.inverse(transformed) if inverse_transform else transformed
        return out.float().cpu().numpy()

    @staticmethod
    def _write_obsm(adata: AnnData, key: str, values: np.ndarray) -> None:
        adata.obsm[key] = values
        logger.info("Wrote adata.obsm[%r] (%d x %d)", key, *values.shape)
