"""The training runner of the image models: scvi-tools' TrainRunner with safe ends."""

from __future__ import annotations

import gc
import logging
import pickle
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerStatus
from scvi import REGISTRY_KEYS
from scvi.train import TrainRunner

from mcvi_ops._constants import PERTURBATION_KEY
from mcvi_ops._logging import without_advertisements

from ._callbacks import (
    DivergenceGuard,
    EpochCheckpoint,
    StopOnInterrupt,
    TrainingDivergedError,
    save_checkpoint,
)

logger = logging.getLogger(__name__)


class ImageTrainRunner(TrainRunner):
    """scvi-tools' :class:`~scvi.train.TrainRunner` that ends every way cleanly.

    - Ctrl-C stops after the current step (:class:`StopOnInterrupt`): the weights, the history so
      far and a checkpoint (``interrupted.ckpt`` beside ``last.ckpt``) are kept and the model is
      usable; a second Ctrl-C stops at once and re-raises :class:`KeyboardInterrupt`.
    - Divergence (:class:`DivergenceGuard`) raises :class:`TrainingDivergedError` after the last
      good weights are put back, without marking the model as trained.
    - Errors propagate unchanged, after the history is kept (without scvi-tools' misleading
      ``Exception raised during training. <class 'NameError'>`` print).
    - Resuming from ``ckpt_path`` loads the checkpoint with ``weights_only=True`` (no code runs).
    - Lightning's advertisements of its cloud services are not logged.

    Examples
    --------
    The image models use it (``_train_runner_cls``); ``model.train()`` runs it:

    >>> model.train(max_epochs=10, checkpoint_dir="run1")  # doctest: +SKIP
    """

    def __init__(self, *args, **kwargs) -> None:
        with without_advertisements():  # the Trainer made here advertises Lightning's cloud
            super().__init__(*args, **kwargs)

    def _callback(self, cls):
        return next((c for c in self.trainer.callbacks if isinstance(c, cls)), None)

    def _check_labels(self) -> None:
        """Refuse cells registered without a perturbation or batch the model knows.

        Query cells (e.g. a model loaded with new cells) may lack them, which embedding
        tolerates; the loss needs both.
        """
        manager = self.model.adata_manager
        for key, what in ((PERTURBATION_KEY, "perturbation"), (REGISTRY_KEYS.BATCH_KEY, "batch")):
            if key not in manager.data_registry:
                continue
            codes = np.asarray(manager.get_from_registry(key)).reshape(-1)
            unknown = int((codes < 0).sum())
            if unknown:
                column = manager.get_state_registry(key).original_key
                msg = (
                    f"{unknown} of {len(codes)} cells have no {what} the model was set up with in "
                    f"adata.obs[{column!r}] (missing, or a value it never saw). Training needs "
                    "every cell labelled: set up these cells with `setup_anndata` and train a "
                    "new model, or drop them; embedding them needs no label."
                )
                raise ValueError(msg)

    def _not_a_checkpoint(self, reason: str) -> str:
        return (
            f"{str(self.ckpt_path)!r} is not a training checkpoint ({reason.splitlines()[0]}). "
            "`ckpt_path=` resumes from the `last.ckpt` or `interrupted.ckpt` of a run's "
            "`checkpoint_dir`; a saved model folder (its model.pt) is loaded with "
            "`mcvi_ops.MCVAE.load(folder, adata)` instead, and trained further with `train()`."
        )

    def _run_training_core(self) -> None:
        self._check_labels()
        if self.ckpt_path is not None and Path(self.ckpt_path).name.endswith("model.pt"):
            raise ValueError(self._not_a_checkpoint("a saved model's file"))
        guard = self._callback(DivergenceGuard)
        fit_kwargs = {"ckpt_path": self.ckpt_path}
        if self.ckpt_path is not None:
            fit_kwargs["weights_only"] = True
        with StopOnInterrupt(self.trainer) as interrupt:
            try:
                with without_advertisements():
                    self.trainer.fit(self.training_plan, self.data_splitter, **fit_kwargs)
            except BaseException as err:
                self._update_history()
                self._release_memory()
                if isinstance(err, SystemExit | KeyboardInterrupt) and (
                    self.trainer.state.status == TrainerStatus.INTERRUPTED
                ):
                    # Lightning turns Ctrl-C into sys.exit(1); hand the user their interrupt
                    self._finish(trained=False)
                    logger.warning(
                        "Training stopped by a second Ctrl-C; the model keeps its current weights "
                        "but is not marked as trained (checkpoint of the last complete epoch: %s).",
                        self._checkpoint_hint(),
                    )
                    raise KeyboardInterrupt from None
                if guard is not None and guard.diverged is not None:
                    self._finish(trained=False)
                    raise TrainingDivergedError(guard.message) from err
                if self.ckpt_path is not None and isinstance(
                    err, pickle.UnpicklingError | KeyError
                ):
                    raise ValueError(self._not_a_checkpoint(repr(err))) from err
                raise
        self._update_history()
        if guard is not None and guard.diverged is not None:
            self._finish(trained=False)
            raise TrainingDivergedError(guard.message)
        # callers that must not report an interrupted run as finished (the command line) read it
        self.model._stopped_by_interrupt = interrupt.requested
        if interrupt.requested:
            path = self._save_interrupted()
            resume = (
                f"To continue, call train() again with the same arguments and `ckpt_path="
                f"{str(self._checkpoint_hint())!r}` (the last complete epoch; the stopped epoch's "
                f"state is in {str(path)!r})."
                if path is not None
                else "No checkpoint was saved (`save_checkpoints=False`)."
            )
            logger.warning(
                "Training was stopped by Ctrl-C after %d steps. The model keeps the weights and "
                "history so far and can be used and saved. %s",
                self.trainer.global_step,
                resume,
            )
        self._finish(trained=True)

    def _finish(self, *, trained: bool) -> None:
        # data splitter only gets these attributes after fit
        self.model.train_indices = getattr(self.data_splitter, "train_idx", None)
        self.model.test_indices = getattr(self.data_splitter, "test_idx", None)
        self.model.validation_indices = getattr(self.data_splitter, "val_idx", None)
        self.model.module.eval()
        if trained:
            self.model.is_trained_ = True
        self.model.to_device(self.device)
        self.model.trainer = self.trainer

    def _checkpoint_hint(self) -> Path | str:
        saver = self._callback(EpochCheckpoint)
        if saver is not None and saver.last_path.exists():
            return saver.last_path
        return "no complete epoch was saved"

    def _save_interrupted(self) -> Path | None:
        saver = self._callback(EpochCheckpoint)
        if saver is None:
            return None
        return save_checkpoint(self.trainer, saver.dirpath / "interrupted.ckpt")

    def _release_memory(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
