"""Training of the image models: defaults, safety callbacks, checkpoints and resuming."""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scvi import settings
from scvi.model.base import UnsupervisedTrainingMixin

from mcvi_ops._compat import use_distributed_sampler
from mcvi_ops._constants import IMAGE_KEY
from mcvi_ops._logging import interactive_output
from mcvi_ops.dataloaders import CropDataSplitter
from mcvi_ops.dataloaders._sampler import _default_seed
from mcvi_ops.train import (
    CellsPerSecondBar,
    CheckInputs,
    DivergenceGuard,
    EpochCheckpoint,
    EpochProgressLog,
    EpochSeed,
    ImageTrainingPlan,
    ImageTrainRunner,
)

logger = logging.getLogger(__name__)

#: cells seen (summed over epochs) that the default number of epochs aims for
_TARGET_CELLS_SEEN = 100_000


def default_max_epochs(n_cells: int) -> int:
    """Default number of epochs: ``ceil(100,000 / n_cells)``, between 2 and 40 epochs.

    Large screens need few passes (the paper trained 2 epochs of 31M cells); small ones more.

    Examples
    --------
    >>> default_max_epochs(10_000)
    10
    """
    return int(np.clip(math.ceil(_TARGET_CELLS_SEEN / max(n_cells, 1)), 2, 40))


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX tiles)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def _trains_on_cpu(accelerator: str) -> bool:
    """Whether Lightning's ``accelerator`` resolves to the CPU."""
    if accelerator == "cpu":
        return True
    if accelerator != "auto":
        return False
    return not torch.cuda.is_available() and not torch.backends.mps.is_available()


#: arguments that ``train()`` took by name before they moved into its groups (and which group)
_MOVED_ARGUMENTS = {
    "weight_decay": "plan_kwargs",
    "n_epochs_kl_warmup": "plan_kwargs",
    "n_steps_kl_warmup": "plan_kwargs",
    "window_chunks": "datasplitter_kwargs",
}


def _check_positive_int(value: Any, name: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        msg = f"`{name}` must be a positive integer, got {value!r}. {hint}"
        raise ValueError(msg)
    return int(value)


class ImageTrainingMixin(UnsupervisedTrainingMixin):
    """``train`` of the image models (balanced, chunk-wise minibatches; safe ends; resuming)."""

    _data_splitter_cls = CropDataSplitter
    _training_plan_cls = ImageTrainingPlan
    _train_runner_cls = ImageTrainRunner
    _balanced_training = True
    #: the checkpoint folder of the last ``train()`` when it was the default one (``save()``
    #: removes it: the saved model replaces it); never a folder the user chose
    _temporary_checkpoints: Path | None = None

    def train(
        self,
        max_epochs: int | None = None,
        *,
        batch_size: int = 128,
        lr: float = 3e-3,
        early_stopping: bool = True,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        precision: str | int | None = None,
        channels_last: bool | None = None,
        train_size: float = 0.9,
        validation_size: float | None = None,
        num_workers: int = 0,
        save_checkpoints: bool = True,
        checkpoint_dir: str | os.PathLike | None = None,
        ckpt_path: str | os.PathLike | None = None,
        divergence_factor: float | None = 100.0,
        enable_progress_bar: bool = True,
        datasplitter_kwargs: dict | None = None,
        plan_kwargs: dict | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        """Train the model on balanced minibatches read chunk-wise from the crop store.

        Training ends cleanly in every case: Ctrl-C stops after the current step, keeping the
        weights and history so far (the model stays usable and savable); a diverging loss
        (NaN, or exploding) raises :class:`~mcvi_ops.train.TrainingDivergedError` with the last
        good weights put back and the model not marked as trained; crops holding NaN/inf pixels
        raise :class:`~mcvi_ops.train.NonFiniteCropsError` naming the cells.

        As in scvi-tools, rarely changed options go in groups: ``plan_kwargs`` (the optimiser and
        KL warm-up, e.g. ``{"weight_decay": 1e-6, "n_epochs_kl_warmup": 5}``),
        ``datasplitter_kwargs`` (the loaders, e.g. ``{"window_chunks": 16}``) and
        ``**trainer_kwargs`` (Lightning, e.g. ``gradient_clip_val=None``,
        ``early_stopping_patience=10``, ``strategy="ddp"``).

        .. long function: documentation and signature; the body is under 80 lines.

        Parameters
        ----------
        max_epochs
            Passes over the perturbed cells (a positive integer). Default: ``ceil(100,000 /
            n_cells)`` between 2 and 40 (:func:`~mcvi_ops.model.default_max_epochs`): 10 epochs
            for 10k cells, 2 for screens of 50k cells and more.
        batch_size
            Cells per minibatch, half controls and half perturbed cells (must be even).
        lr
            Adam learning rate. 3e-3 learned fastest on a CPU budget in our comparison of 1e-4
            (the paper's, too slow for a few epochs), 1e-3 and 3e-3 (``benchmarks/RESULTS.md``).
        early_stopping
            Stop when the validation loss has not improved for ``early_stopping_patience`` epochs
            (a trainer argument, 5 by default; disabled under DDP by scvi-tools, and without
            validation cells).
        accelerator
            ``"auto"``, ``"cpu"``, ``"gpu"``, ...
        devices
            Devices to use; with ``strategy="ddp"`` each rank trains on its own shard of both
            control and perturbed cells.
        precision
            Lightning precision, e.g. ``"bf16-mixed"`` on recent GPUs. `None`: ``"bf16-mixed"``
            when training on a CPU with native bfloat16 (AVX512-BF16 or AMX: recent Xeon and
            EPYC), which trained 1.8x faster than float32 there with the same same-complex
            average precision (``benchmarks/results/training.md``); float32 otherwise.
        channels_last
            Store the convolutions' weights channels-last (NHWC). `None`: when training on a CPU
            in float32, where it trained 1.3x faster (it slowed bfloat16 down there).
        train_size
            Fraction of cells (controls and perturbed alike) used for training; ``1.0`` trains on
            every cell without validation (and without early stopping).
        validation_size
            Fraction used for validation (default: the rest).
        num_workers
            Data-loader worker processes.
        save_checkpoints
            Save a checkpoint (``last.ckpt``) at the end of every epoch, and
            ``interrupted.ckpt`` when Ctrl-C stops training.
        checkpoint_dir
            Folder of the checkpoints, kept as it is. Default: a run folder under
            ``scvi.settings.logging_dir`` (``./scvi_log/<model>_<run name>/checkpoints``), named
            in the log when training ends and removed by :meth:`save` (the saved model replaces
            it).
        ckpt_path
            Resume from this checkpoint (e.g. ``<checkpoint_dir>/last.ckpt``): call ``train`` with
            the same arguments as the run that wrote it. Resuming from ``last.ckpt`` (the end of
            an epoch) continues exactly like the uninterrupted run (the noise of each epoch is
            seeded from ``scvi.settings.seed`` and the epoch); ``interrupted.ckpt`` holds the
            weights at the moment of a Ctrl-C, and resuming from it counts the stopped epoch as
            done.
        divergence_factor
            Stop (and raise) when a loss rises above the first step's by this many times its
            magnitude; `None`: only NaN/inf losses or weights count as divergence.
        enable_progress_bar
            Show progress: in a terminal or notebook a per-step bar with the cells trained per
            second; otherwise (batch jobs, CI logs) one log line per epoch.
        datasplitter_kwargs
            More arguments of :class:`~mcvi_ops.dataloaders.CropDataSplitter` (``window_chunks``:
            store chunks shuffled together, 8; larger mixes better, smaller reads more
            sequentially) and its loaders (``prefetch_factor``, ...).
        plan_kwargs
            More arguments of :class:`scvi.train.TrainingPlan`: ``weight_decay`` (Adam, 0),
            ``n_epochs_kl_warmup`` (epochs over which the KL weight grows from 0 to 1) or
            ``n_steps_kl_warmup`` (minibatches; default a third of all training steps), ...
        **trainer_kwargs
            More arguments of :class:`scvi.train.Trainer` / :class:`lightning.pytorch.Trainer`:
            ``gradient_clip_val`` (10; `None` for no clipping), ``early_stopping_patience`` (5),
            ``strategy="ddp"``, ``callbacks=[...]``, ``max_steps``, ...

        Returns
        -------
        Nothing; training curves are in ``model.history``.

        Examples
        --------
        >>> model.train(max_epochs=10, checkpoint_dir="run1")  # doctest: +SKIP
        >>> # after Ctrl-C, or in a new session with a new model on the same data:
        >>> model.train(max_epochs=10, ckpt_path="run1/last.ckpt")  # doctest: +SKIP
        >>> model.train(plan_kwargs={"weight_decay": 1e-6})  # doctest: +SKIP
        """
        plan_kwargs, datasplitter_kwargs = self._take_moved_arguments(
            trainer_kwargs, dict(plan_kwargs or {}), dict(datasplitter_kwargs or {})
        )
        max_epochs = self._check_train_arguments(max_epochs, batch_size, lr, ckpt_path)
        self._check_store(self.adata_manager)
        splitter = self._data_splitter_cls(
            self.adata_manager,
            train_size=train_size,
            validation_size=validation_size,
            batch_size=batch_size,
            distributed_sampler=use_distributed_sampler(trainer_kwargs.get("strategy")),
            **{
                "balanced": self._balanced_training,
                "num_workers": num_workers,
                "window_chunks": 8,
                **datasplitter_kwargs,
            },
        )
        steps_per_epoch = self._steps_per_epoch(batch_size, train_size)
        plan = self._plan_kwargs(lr, plan_kwargs, steps=steps_per_epoch * max_epochs)
        early_stopping = self._set_validation(
            trainer_kwargs, splitter, early_stopping, train_size, steps_per_epoch
        )
        trainer_kwargs.setdefault("gradient_clip_val", 10.0)
        self._set_precision(trainer_kwargs, accelerator, precision, channels_last)
        checkpoints = self._checkpoint_dir(checkpoint_dir) if save_checkpoints else None
        trainer_kwargs["callbacks"] = self._training_callbacks(
            trainer_kwargs,
            divergence_factor=divergence_factor,
            checkpoint_dir=checkpoints,
            enable_progress_bar=enable_progress_bar,
        )
        trainer_kwargs["enable_progress_bar"] = enable_progress_bar
        trainer_kwargs["simple_progress_bar"] = False
        super().train(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            batch_size=batch_size,
            early_stopping=early_stopping,
            datamodule=splitter,
            plan_kwargs=plan,
            ckpt_path=None if ckpt_path is None else str(ckpt_path),
            **trainer_kwargs,
        )
        self._name_checkpoints(checkpoints, temporary=checkpoint_dir is None)
        self._after_training()

    # --- the steps of `train` ---------------------------------------------------------------
    @staticmethod
    def _take_moved_arguments(
        trainer_kwargs: dict[str, Any], plan_kwargs: dict, datasplitter_kwargs: dict
    ) -> tuple[dict, dict]:
        """Move arguments that ``train()`` once took by name into their group, with a warning."""
        groups = {"plan_kwargs": plan_kwargs, "datasplitter_kwargs": datasplitter_kwargs}
        for name, group in _MOVED_ARGUMENTS.items():
            if name in trainer_kwargs:
                value = trainer_kwargs.pop(name)
                warnings.warn(
                    f"`train({name}=...)` moved into `{group}`: pass "
                    f"`{group}={{{name!r}: {value!r}}}` (the keyword will be removed in a future "
                    "release).",
                    FutureWarning,
                    stacklevel=3,
                )
                groups[group].setdefault(name, value)
        return plan_kwargs, datasplitter_kwargs

    def _check_train_arguments(
        self, max_epochs: Any, batch_size: int, lr: Any, ckpt_path: str | os.PathLike | None
    ) -> int:
        """The number of epochs, refusing impossible arguments before any work is done."""
        if batch_size < 2 or (self._balanced_training and batch_size % 2):
            msg = (
                f"`batch_size` must be an even number >= 2 (half controls, half perturbed cells), "
                f"got {batch_size}."
            )
            raise ValueError(msg)
        default_epochs = default_max_epochs(self.adata.n_obs)
        max_epochs = _check_positive_int(
            default_epochs if max_epochs is None else max_epochs,
            "max_epochs",
            f"Pass the number of passes over the data, or None for "
            f"the default ({default_epochs} for {self.adata.n_obs} cells).",
        )
        if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
            msg = f"`lr` must be a positive number, got {lr!r}."
            raise ValueError(msg)
        if ckpt_path is not None and not Path(ckpt_path).is_file():
            msg = (
                f"No checkpoint at {str(ckpt_path)!r}. Pass the `last.ckpt` (or "
                "`interrupted.ckpt`) of the run to resume, from its `checkpoint_dir`."
            )
            raise FileNotFoundError(msg)
        return max_epochs

    @staticmethod
    def _plan_kwargs(lr: float, plan_kwargs: dict, *, steps: int) -> dict[str, Any]:
        """Arguments of the training plan: the defaults, then ``plan_kwargs``."""
        plan = {
            "lr": lr,
            # standard Adam: scvi-tools' eps=0.01 (tuned for count models) stalls every
            # parameter whose gradient, after clipping a loss summed over all pixels, is below
            # it (the per-perturbation prior means moved 3e-7 per step), see
            # benchmarks/results/calibration.md
            "eps": 1e-8,
            "weight_decay": 0.0,
            "n_epochs_kl_warmup": None,
            "n_steps_kl_warmup": None,
            **plan_kwargs,
        }
        if plan["n_epochs_kl_warmup"] is None and plan["n_steps_kl_warmup"] is None:
            # warm up over the first third of all steps (per step, so 1-2 epoch runs on big
            # screens warm up smoothly instead of jumping from 0 to 1 at an epoch boundary)
            plan["n_steps_kl_warmup"] = max(1, steps // 3)
        return plan

    @staticmethod
    def _set_validation(
        trainer_kwargs: dict[str, Any],
        splitter: CropDataSplitter,
        early_stopping: bool,
        train_size: float,
        steps_per_epoch: int,
    ) -> bool:
        """Validation and early stopping in ``trainer_kwargs``; whether early stopping is on."""
        max_steps = trainer_kwargs.get("max_steps", -1)
        if early_stopping and max_steps is not None and 0 <= max_steps < steps_per_epoch:
            # validation runs at the end of an epoch, so a run stopped by `max_steps` within the
            # first epoch has no validation loss to watch (Lightning would raise at epoch end)
            logger.info(
                "max_steps=%d ends training within the first epoch, before any validation: "
                "training without early stopping.",
                max_steps,
            )
            early_stopping = False
        if splitter.n_val > 0:
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
            trainer_kwargs.setdefault("early_stopping_monitor", "validation_loss")
            trainer_kwargs.setdefault("early_stopping_patience", 5)
            return early_stopping
        if early_stopping:
            logger.info(
                "No validation cells (train_size=%g): training without validation and "
                "without early stopping.",
                train_size,
            )
        trainer_kwargs["limit_val_batches"] = 0
        return False

    def _set_precision(
        self,
        trainer_kwargs: dict[str, Any],
        accelerator: str,
        precision: str | int | None,
        channels_last: bool | None,
    ) -> None:
        """bf16 on CPUs that compute in it natively; channels-last weights for CPU float32."""
        # our batch sampler shards per rank itself; Lightning must not replace it
        trainer_kwargs.setdefault("use_distributed_sampler", False)
        on_cpu = _trains_on_cpu(accelerator)
        if precision is None and on_cpu and cpu_has_bf16():
            precision = "bf16-mixed"
        if precision is not None:
            trainer_kwargs["precision"] = precision
        if channels_last is None:
            channels_last = on_cpu and str(precision or "32-true") in ("32", "32-true")
        if channels_last:
            self.module.to(memory_format=torch.channels_last)

    def _name_checkpoints(self, checkpoint_dir: Path | None, *, temporary: bool) -> None:
        """Say where this run's checkpoints are; remember a default folder for ``save()``."""
        self._temporary_checkpoints = checkpoint_dir if temporary else None
        if checkpoint_dir is None or not (checkpoint_dir / "last.ckpt").exists():
            return
        if temporary:
            logger.info(
                "Checkpoints of this run: %s (`train(ckpt_path=...)` resumes from last.ckpt); "
                "`save()` removes them, the saved model replaces them.",
                checkpoint_dir,
            )
        else:
            logger.info("Checkpoints of this run: %s", checkpoint_dir)

    def _after_training(self) -> None:
        """Checks of the trained model (each model class adds its own)."""

    def _training_callbacks(
        self,
        trainer_kwargs: dict[str, Any],
        *,
        divergence_factor: float | None,
        checkpoint_dir: Path | None,
        enable_progress_bar: bool,
    ) -> list:
        callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
        crop_indices = np.asarray(self.adata_manager.get_from_registry(IMAGE_KEY)).reshape(-1)
        guard = DivergenceGuard(divergence_factor)
        callbacks += [CheckInputs(self.adata.obs_names, crop_indices), guard]
        callbacks.append(EpochSeed(_default_seed()))
        if checkpoint_dir is not None:
            callbacks.append(EpochCheckpoint(checkpoint_dir, guard=guard))
            logger.info("Checkpoints of each epoch go to %s", checkpoint_dir / "last.ckpt")
        refresh = trainer_kwargs.pop("progress_bar_refresh_rate", 1)
        if enable_progress_bar:
            # a bar refreshed per step is one line per refresh in a log file
            interactive = interactive_output()
            callbacks.append(
                CellsPerSecondBar(refresh_rate=refresh) if interactive else EpochProgressLog()
            )
        return callbacks

    def _checkpoint_dir(self, checkpoint_dir: str | os.PathLike | None) -> Path:
        if checkpoint_dir is not None:
            return Path(checkpoint_dir)
        run = f"{type(self).__name__}_{self.run_name}_{self.id[:8]}"
        return Path(settings.logging_dir) / run / "checkpoints"

    def _steps_per_epoch(self, batch_size: int, train_size: float) -> int:
        control = self._is_control_cell()
        if self._balanced_training:
            n_cells, per_batch = int((~control).sum()), batch_size // 2
        else:
            n_cells, per_batch = len(control), batch_size
        return max(1, math.ceil(n_cells * train_size / per_batch))
