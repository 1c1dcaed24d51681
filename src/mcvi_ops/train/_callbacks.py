"""Lightning callbacks that make training safe: input checks, divergence, checkpoints, progress."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar, TQDMProgressBar
from scvi import REGISTRY_KEYS

# NonFiniteCropsError and its message are defined with the loaders' checks (one home) and stay
# importable from here
from mcvi_ops.dataloaders._checks import (  # noqa: F401
    NonFiniteCropsError,
    check_finite_batch,
    describe_cells,
    nonfinite_crops_message,
)

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """Training stopped because the loss became non-finite or exploded."""


class CheckInputs(Callback):
    """Stop training with an error naming the cells when a minibatch holds NaN/inf pixels.

    Without it such a minibatch reaches the loss as NaN and torch raises a distribution
    constraint error that names no cell.

    Parameters
    ----------
    obs_names
        Names of the AnnData rows.
    crop_indices
        Crop index of each row, to name the rows of the crop indices found in a minibatch.

    Examples
    --------
    >>> crop_indices = adata.obs["crop_index"].to_numpy()  # doctest: +SKIP
    >>> model.train(callbacks=[CheckInputs(adata.obs_names, crop_indices)])  # doctest: +SKIP
    """

    def __init__(self, obs_names: Sequence[str], crop_indices: np.ndarray) -> None:
        self.obs_names = np.asarray(obs_names)
        self.crop_indices = np.asarray(crop_indices).reshape(-1)

    def _check(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        check_finite_batch(batch, f"of a {stage} minibatch", self.obs_names, self.crop_indices)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._check(batch, "training")

    def on_validation_batch_start(
        self, trainer, pl_module, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._check(batch, "validation")


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def _all_finite(module: torch.nn.Module) -> bool:
    # one reduction (NaN and inf propagate through sums): ~2 ms for 1M weights on a CPU
    sums = [p.detach().float().sum() for p in module.parameters()]
    return bool(torch.isfinite(torch.stack(sums).sum())) if sums else True


class DivergenceGuard(Callback):
    """Stop training when the loss becomes non-finite or explodes, keeping the last good weights.

    A training step diverges when its loss (or, at an epoch's end, the validation loss) is NaN or
    infinite, exceeds ``first + factor * max(|first|, 1)`` where ``first`` is the loss of this
    run's first step, or leaves non-finite weights. The guard then puts back the weights of the
    last snapshot whose loss was finite and bounded (snapshots are taken every
    ``snapshot_every_n_steps`` steps and at each epoch's end and confirmed by the next loss) and
    stops the trainer. The training runner then raises :class:`TrainingDivergedError` and leaves
    the model unmarked as trained.

    Parameters
    ----------
    factor
        How many times the first loss's magnitude the loss may rise above it; `None`: only
        non-finite losses and weights count as divergence.
    snapshot_every_n_steps
        Steps between snapshots of the weights.

    Examples
    --------
    The models add one to every run; ``divergence_factor`` sets its factor:

    >>> model.train(lr=10.0)  # doctest: +SKIP
    TrainingDivergedError: Training diverged at epoch 0, step 2 (training): the loss exploded ...
    """

    def __init__(self, factor: float | None = 100.0, snapshot_every_n_steps: int = 50) -> None:
        if factor is not None and not factor > 0:
            msg = f"The divergence factor must be positive or None, got {factor}."
            raise ValueError(msg)
        self.factor = factor
        self.snapshot_every_n_steps = max(1, int(snapshot_every_n_steps))
        self.diverged: dict[str, Any] | None = None
        self._good: dict[str, torch.Tensor] | None = None
        self._good_step = 0
        self._candidate: tuple[int, dict[str, torch.Tensor]] | None = None
        self._first: float | None = None

    @property
    def limit(self) -> float:
        """The largest loss that does not count as exploding."""
        if self.factor is None or self._first is None:
            return math.inf
        return self._first + self.factor * max(abs(self._first), 1.0)

    def on_train_start(self, trainer, pl_module) -> None:
        self.diverged, self._first, self._candidate = None, None, None
        self._good, self._good_step = _snapshot(pl_module.module), trainer.global_step

    def _bad_loss(self, value: float) -> str | None:
        if not math.isfinite(value):
            return f"the loss became {value}"
        if value > self.limit:
            return (
                f"the loss exploded to {value:.4g}, more than {self.factor:g} times the first "
                f"loss's magnitude above it ({self._first:.4g})"
            )
        return None

    def _diverge(self, trainer, pl_module, reason: str, *, stage: str) -> None:
        if self.diverged is not None:
            return
        if self._good is not None:
            pl_module.module.load_state_dict(self._good)
        self.diverged = {
            "reason": reason,
            "stage": stage,
            "epoch": int(trainer.current_epoch),
            "step": int(trainer.global_step),
            "restored_step": int(self._good_step),
        }
        trainer.should_stop = True
        logger.debug("Training diverged: %s", self.message)

    @property
    def message(self) -> str:
        """What happened and what to do about it."""
        if self.diverged is None:
            return ""
        d = self.diverged
        return (
            f"Training diverged at epoch {d['epoch']}, step {d['step']} ({d['stage']}): "
            f"{d['reason']}. Training stopped and the weights of step {d['restored_step']}, the "
            "last with a finite, bounded loss, were put back; the model is not marked as "
            "trained. Train again with a lower `lr` (e.g. 10 times lower), keep "
            "`gradient_clip_val` set, or check the crops for artefacts."
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.diverged is not None:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        value = float(loss.detach())
        if self._first is None and math.isfinite(value):
            self._first = value
        reason = self._bad_loss(value)
        if reason is None and not _all_finite(pl_module.module):
            reason = "the weights became NaN or infinite after the optimizer step"
        if reason is not None:
            self._diverge(trainer, pl_module, reason, stage="training")
            return
        # this loss was computed with the candidate's weights: they are good
        if self._candidate is not None:
            self._good_step, self._good = self._candidate
            self._candidate = None
        if trainer.global_step % self.snapshot_every_n_steps == 0:
            self._candidate = (int(trainer.global_step), _snapshot(pl_module.module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.diverged is None and _all_finite(pl_module.module):
            self._candidate = (int(trainer.global_step), _snapshot(pl_module.module))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.diverged is not None:
            return
        value = trainer.callback_metrics.get("validation_loss")
        if value is None:
            return
        reason = self._bad_loss(float(value))
        if reason is not None:
            self._diverge(trainer, pl_module, f"validation: {reason}", stage="validation")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # NaN weights or activations surface as torch.distributions argument errors
        if isinstance(exception, ValueError) and "Expected parameter" in str(exception):
            self._diverge(
                trainer,
                pl_module,
                "the model produced NaN or infinite values (a distribution parameter was invalid)",
                stage="training",
            )


class EpochSeed(Callback):
    """Seed torch at every epoch's first step from ``(seed, epoch)``, so resumed runs match.

    The reparametrisation noise of epoch ``e`` then depends only on the seed and ``e``: a run
    resumed from a checkpoint saved at an epoch's end continues exactly like an uninterrupted one.
    The seed is saved in checkpoints and restored with them.

    Parameters
    ----------
    seed
        Base seed (``scvi.settings.seed`` by default in the models).

    Examples
    --------
    >>> seed = EpochSeed(0)
    >>> seed.state_dict()
    {'seed': 0}
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # at the first batch rather than at `on_train_epoch_start`, which Lightning skips when
        # it resumes from a checkpoint saved at an epoch's end
        if batch_idx == 0:
            state = np.random.SeedSequence([self.seed, int(trainer.current_epoch)])
            torch.manual_seed(int(state.generate_state(1)[0]))

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.seed = int(state_dict["seed"])


class EpochCheckpoint(Callback):
    """Save ``last.ckpt`` in ``dirpath`` at the end of every complete epoch.

    Epochs cut short (Ctrl-C, divergence) are not saved, so ``last.ckpt`` always holds the state
    of a finished epoch, from which ``model.train(..., ckpt_path=...)`` resumes.

    Parameters
    ----------
    dirpath
        Folder of the checkpoints (created if needed).
    guard
        The run's :class:`DivergenceGuard`: nothing is saved once it has fired.

    Examples
    --------
    The models add one to every run (``checkpoint_dir``, ``save_checkpoints``):

    >>> model.train(max_epochs=10, checkpoint_dir="run1")  # doctest: +SKIP
    >>> model.train(max_epochs=10, ckpt_path="run1/last.ckpt")  # doctest: +SKIP
    """

    FILENAME = "last.ckpt"

    def __init__(self, dirpath: str | os.PathLike, *, guard: DivergenceGuard | None = None):
        self.dirpath = Path(dirpath)
        self.guard = guard

    @property
    def last_path(self) -> Path:
        """Path of the checkpoint of the last complete epoch."""
        return self.dirpath / self.FILENAME

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        complete = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if not complete or (self.guard is not None and self.guard.diverged is not None):
            return
        save_checkpoint(trainer, self.last_path)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, file too large, no permission).

    ``checkpoint`` is the file, ``reason`` the operating system's error and ``kept`` what is
    left of the previous checkpoint.
    """

    checkpoint: Path
    reason: str
    kept: str


def save_checkpoint(trainer: pl.Trainer, path: str | os.PathLike) -> Path:
    """Write a Lightning checkpoint atomically (a temporary file renamed), from every rank.

    A write that fails (disk full, file-size limit) leaves the previous checkpoint at ``path``
    as it was and raises :class:`CheckpointWriteError` naming the file.
    """
    path = Path(path)
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        trainer.save_checkpoint(partial, weights_only=False)
        if trainer.is_global_zero and partial.exists():
            os.replace(partial, path)
    except OSError as err:
        partial.unlink(missing_ok=True)
        kept = (
            f"the previous checkpoint {str(path)!r} is unchanged"
            if path.exists()
            else "no earlier checkpoint exists there"
        )
        msg = (
            f"Could not write the checkpoint {str(path)!r}: {err.strerror or err}; {kept}. Free "
            "disk space (or raise the file-size limit, or pass another `checkpoint_dir`), then "
            "resume from the last checkpoint with `ckpt_path=`."
        )
        error = CheckpointWriteError(err.errno, msg)
        error.checkpoint, error.reason, error.kept = path, str(err.strerror or err), kept
        raise error from err
    trainer.strategy.barrier("mcvi_ops_checkpoint")
    return path


class StopOnInterrupt:
    """While active, a first Ctrl-C (SIGINT) stops training after the current step.

    The trainer then ends normally: the weights and history so far are kept. A second Ctrl-C
    interrupts at once. Outside the main thread (where signals cannot be caught) it does nothing.

    Parameters
    ----------
    trainer
        The trainer to stop.

    Examples
    --------
    >>> with StopOnInterrupt(trainer):  # doctest: +SKIP
    ...     trainer.fit(plan, datamodule)
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.trainer.should_stop = True
        logger.warning(
            "Ctrl-C: stopping training after the current step (press Ctrl-C again to stop now)."
        )

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        # also undoes Lightning's SIG_IGN after a hard interrupt
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False


class CellsPerSecondBar(TQDMProgressBar):
    """Lightning's per-step progress bar, with the cells trained per second of the epoch.

    Parameters
    ----------
    refresh_rate
        Steps between refreshes of the bar.

    Examples
    --------
    The models show it unless ``enable_progress_bar=False``:

    >>> model.train(max_epochs=2)  # doctest: +SKIP
    Epoch 0:  45%|████▌     | 36/80 [00:09<00:11, 3.9it/s, cells/s=502]
    """

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._cells = 0
        self._start = time.perf_counter()
        self.cells_per_second = 0.0

    def on_train_epoch_start(self, trainer, *args) -> None:
        self._cells, self._start = 0, time.perf_counter()
        super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._cells += len(batch[REGISTRY_KEYS.X_KEY])
        self.cells_per_second = self._cells / max(time.perf_counter() - self._start, 1e-9)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        if self.cells_per_second:
            items["cells/s"] = f"{self.cells_per_second:,.0f}"
        return items


class EpochProgressLog(ProgressBar):
    """One log line per epoch (losses, cells per second, time): progress for log files.

    ``train()`` reports progress with it instead of :class:`CellsPerSecondBar` when standard
    output is neither a terminal nor a notebook (batch jobs, CI), where every refresh of a bar
    would be another line.

    Examples
    --------
    >>> model.train(max_epochs=2)  # doctest: +SKIP
    INFO mcvi_ops.train._callbacks: Epoch 1/2: train_loss 2.1e+04, validation_loss 2.1e+04, 502 cells/s, 9 s
    """

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._cells = 0
        self._start = time.perf_counter()

    def disable(self) -> None:
        """Stop writing the per-epoch lines (Lightning calls it on non-zero ranks)."""
        self._enabled = False

    def enable(self) -> None:
        """Write the per-epoch lines again."""
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        """Whether the per-epoch lines are written."""
        return self._enabled

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._cells, self._start = 0, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._cells += len(batch[REGISTRY_KEYS.X_KEY])

    def line(self, trainer) -> str:
        """The line of the epoch that just ended."""
        seconds = time.perf_counter() - self._start
        metrics = trainer.callback_metrics
        losses = []
        for name, keys in (
            ("train_loss", ("train_loss_epoch", "train_loss")),
            ("validation_loss", ("validation_loss",)),
        ):
            key = next((k for k in keys if k in metrics), None)
            if key is not None:
                losses.append(f"{name} {float(metrics[key]):.3g}")
        rate = f"{self._cells / max(seconds, 1e-9):,.0f} cells/s"
        epochs = f"{trainer.current_epoch + 1}/{trainer.max_epochs}"
        return f"Epoch {epochs}: {', '.join([*losses, rate, f'{seconds:.0f} s'])}"

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._enabled and not trainer.sanity_checking:
            logger.info("%s", self.line(trainer))
