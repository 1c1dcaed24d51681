"""``mcvi-ops train`` (fit MCVAE, or FeatureMCVAE on a feature table) and ``mcvi-ops embed``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from mcvi_ops._constants import OBSM

from . import _run
from ._common import add_command, check_obs_column, read_adata

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
SCREEN_NAME = "screen.h5ad"
HISTORY_NAME = "history.csv"
CHECKPOINT_DIR = "checkpoints"
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
#: exit status of a run stopped by Ctrl-C (as shells report SIGINT)
INTERRUPTED_STATUS = 130

_TRAIN_DESCRIPTION = """\
Train the Multi-Contrastive VAE on your own screen: CELLS is an AnnData (.h5ad) whose rows are
linked to their crops, as written by 'mcvi-ops crop' or the mcvi_ops.io readers. Writes

  OUT/model/       the trained model (mcvi_ops.MCVAE.load(OUT/model, adata))
  OUT/screen.h5ad  the cells with .obsm X_mcvae_salient, X_mcvae_background and X_mcvae
  OUT/history.csv  training and validation losses per epoch
  OUT/checkpoints/ the state after each epoch: rerun with --resume to continue a run that
                   stopped (same options; Ctrl-C stops after the current step and keeps it)

With --features, CELLS is a cells x features table instead (CellProfiler via
mcvi_ops.tl.cellprofiler_features, brieflow, cp_measure or pycytominer-style tables, features in
.X or --layer) and the model is FeatureMCVAE: it standardises every feature against the controls
of each --batch-key batch, and removes the controls' trend along the numeric --covariates
(e.g. fov_distance). The embeddings are X_fmcvae_salient, X_fmcvae_background and X_fmcvae;
feature models train in minutes and keep no checkpoints (no --resume).

Next: 'mcvi-ops evaluate OUT/screen.h5ad --relationships ... --out ...'.
"""

_EMBED_DESCRIPTION = """\
Embed cells with a trained model: MODEL is the model folder of 'mcvi-ops train' (OUT/model) and
CELLS an AnnData linked to crops of the same channels and crop size. Writes OUT, a copy of CELLS
with .obsm X_mcvae_salient, X_mcvae_background and X_mcvae.

Embedded as they are (the encoders read neither the perturbation nor the batch):
  cells with perturbations or batches the model never saw, cells without a label (no column,
  or missing values such as brieflow cells without a barcode), integer labels, a read-back
  copy of the training cells, and zero cells (an empty result).
Refused with the fix named:
  crops of other channels, crop size, pixel type or intensity scale than the training crops,
  crops with NaN/inf pixels, and (for models set up with intensity factors in Python) cells
  without their own finite, positive .obsm intensity factors.

A FeatureMCVAE model (from 'train --features') embeds a feature table with the training features
(same names; other features are refused) into X_fmcvae_salient, X_fmcvae_background and
X_fmcvae. Cells of batches it never saw are standardised against their own controls, so each new
batch needs control cells (and the batch and perturbation columns of the set-up).
"""

#: the model class of each kind of input, and the embeddings it writes (salient, background, both)
EMBEDDINGS = {
    "MCVAE": (OBSM.salient, OBSM.background, OBSM.both),
    "FeatureMCVAE": (OBSM.features_salient, OBSM.features_background, OBSM.features_both),
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"expected a positive whole number, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _devices(text: str) -> int | list[int] | str:
    """``auto``, a number of devices, or a comma-separated list of device indices."""
    if text == "auto":
        return text
    try:
        if "," in text:
            indices = [int(part) for part in text.split(",") if part.strip()]
            if indices and min(indices) >= 0:
                return indices
        elif int(text) >= 1:
            return int(text)
    except ValueError:
        pass
    msg = (
        f"expected 'auto', a number of devices (e.g. 2) or device indices (e.g. 0,1), got {text!r}"
    )
    raise argparse.ArgumentTypeError(msg)


def _even_int(text: str) -> int:
    value = _positive_int(text)
    if value < 2 or value % 2:
        msg = f"expected an even number >= 2 (half controls, half perturbed cells), got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def add_train_parser(subparsers: Any) -> None:
    """Add the ``train`` sub-command."""
    parser = add_command(
        subparsers,
        "train",
        help="train MCVAE on your screen (AnnData linked to crops) -> model + embeddings",
        description=_TRAIN_DESCRIPTION,
    )
    parser.add_argument(
        "cells",
        metavar="CELLS",
        type=Path,
        help="AnnData (.h5ad) linked to crops, or a feature table with --features",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--features",
        action="store_true",
        help="CELLS is a cells x features table: train FeatureMCVAE on it",
    )
    parser.add_argument(
        "--layer", default=None, help="with --features: layer holding the features (default: X)"
    )
    parser.add_argument(
        "--covariates",
        nargs="+",
        default=None,
        metavar="COLUMN",
        help="with --features: numeric obs columns given to the decoder, e.g. fov_distance",
    )
    parser.add_argument(
        "--perturbation-key",
        default="gene_symbol",
        help="obs column naming each cell's perturbation, gene or guide (gene_symbol)",
    )
    parser.add_argument(
        "--control-category",
        default="nontargeting",
        help="value of the perturbation column that marks control cells (nontargeting)",
    )
    parser.add_argument(
        "--batch-key", default=None, help="obs column of a technical batch, e.g. plate_well"
    )
    parser.add_argument(
        "--max-epochs",
        type=_positive_int,
        default=None,
        help=(
            "passes over the perturbed cells (default: 100,000 cells seen, 2 to 40 epochs; "
            "--features: 300,000, 5 to 100)"
        ),
    )
    parser.add_argument(
        "--batch-size",
        type=_even_int,
        default=None,
        help="cells per minibatch, even (128; --features: 256)",
    )
    parser.add_argument(
        "--accelerator", choices=ACCELERATORS, default="auto", help="device to train on (auto)"
    )
    parser.add_argument(
        "--devices",
        type=_devices,
        default="auto",
        help="number of devices (2), device indices (0,1), or 'auto'",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier model and outputs in OUT"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUT from its last checkpoint (give the same options)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_train)


def add_embed_parser(subparsers: Any) -> None:
    """Add the ``embed`` sub-command."""
    parser = add_command(
        subparsers,
        "embed",
        help="embed cells with a trained model -> h5ad with X_mcvae_salient/background",
        description=_EMBED_DESCRIPTION,
    )
    parser.add_argument("model", metavar="MODEL", type=Path, help="model folder of 'train'")
    parser.add_argument(
        "cells",
        metavar="CELLS",
        type=Path,
        help="AnnData (.h5ad) linked to crops, or a feature table for a FeatureMCVAE model",
    )
    parser.add_argument("--out", type=Path, required=True, help="output AnnData (.h5ad)")
    parser.add_argument(
        "--batch-size", type=_positive_int, default=256, help="cells per minibatch (256)"
    )
    parser.add_argument(
        "--accelerator", choices=ACCELERATORS, default="auto", help="device to run on (auto)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=run_embed)


def _check_perturbations(adata, key: str, control: str, path: Path) -> tuple[int, int]:
    values = adata.obs[key]
    if values.isna().any():
        msg = (
            f"{int(values.isna().sum())} cells of {str(path)!r} have no value in obs[{key!r}]. "
            f"Label them (controls as {control!r}) or drop them."
        )
        raise ValueError(msg)
    is_control = (values.astype(str) == control).to_numpy()
    if not is_control.any():
        examples = list(values.astype(str).unique()[:5])
        msg = (
            f"No control cells: obs[{key!r}] never equals {control!r} (values include {examples})."
            " Pass --control-category naming the controls' value."
        )
        raise ValueError(msg)
    if is_control.all():
        msg = (
            f"Every cell of {str(path)!r} is a control ({key} == {control!r}); MCVAE contrasts "
            "perturbed cells with controls. Check --perturbation-key."
        )
        raise ValueError(msg)
    return int(is_control.sum()), int((~is_control).sum())


def _checkpoint(folder: Path) -> Path | None:
    """The checkpoint to resume from: the newer of ``interrupted.ckpt`` and ``last.ckpt``."""
    found = _run.checkpoints(folder)
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _check_batches(adata, key: str, path: Path) -> None:
    missing = adata.obs[key].isna().to_numpy()
    if missing.any():
        rows = [str(r) for r in adata.obs_names[missing][:3]]
        msg = (
            f"{int(missing.sum())} cells of {str(path)!r} have no value in obs[{key!r}] "
            f"(--batch-key), e.g. {rows}. Fill them in or drop those cells, or train without "
            "--batch-key."
        )
        raise ValueError(msg)


def _check_feature_options(args: argparse.Namespace) -> None:
    """Options that only one kind of model takes; the batch size each defaults to."""
    if not args.features:
        given = [f for f, v in (("--layer", args.layer), ("--covariates", args.covariates)) if v]
        if given:
            msg = (
                f"{' and '.join(given)} apply to feature tables only. Pass --features (CELLS is "
                "a cells x features table), or leave them out for crops."
            )
            raise ValueError(msg)
    elif args.resume:
        msg = (
            "--resume continues image models from their checkpoints; FeatureMCVAE trains in "
            "minutes and keeps none. Pass --overwrite to train it again."
        )
        raise ValueError(msg)
    if args.batch_size is None:
        args.batch_size = 256 if args.features else 128


def _prepare_out(args: argparse.Namespace) -> tuple[Path | None, dict | None]:
    """Check ``--out`` before any work; returns the checkpoint to resume and the run record."""
    from mcvi_ops.data._files import check_writable_folder

    out: Path = args.out
    _check_feature_options(args)
    if args.resume and args.overwrite:
        msg = "Pass either --resume (continue the run in --out) or --overwrite (start again)."
        raise ValueError(msg)
    fix = "Pass --out naming a folder you can write to."
    check_writable_folder(out, what="--out", fix=fix)
    check_writable_folder(out / CHECKPOINT_DIR, what="The checkpoint folder", fix=fix)
    record = _run.read_record(out)
    outputs = (out / MODEL_DIR).exists() or (out / SCREEN_NAME).exists()
    resume = _checkpoint(out / CHECKPOINT_DIR)
    if args.resume:
        finished = record is not None and record.get("status") == "finished" and outputs
        if resume is None and not finished:
            msg = (
                f"No checkpoint to resume from in {str(out / CHECKPOINT_DIR)!r} (last.ckpt or "
                "interrupted.ckpt). Run without --resume to start training (with --overwrite "
                "to replace what the folder holds)."
            )
            raise FileNotFoundError(msg)
        return resume, record
    if args.overwrite:
        _run.clear_checkpoints(out / CHECKPOINT_DIR)
        return None, None
    if outputs:
        msg = (
            f"{str(out)!r} already holds a model or {SCREEN_NAME}. Pass --overwrite to replace "
            "them, or --resume to continue that run."
        )
        raise FileExistsError(msg)
    if resume is not None:
        msg = (
            f"{str(out)!r} holds the checkpoints of an unfinished run ({resume.name}). Pass "
            "--resume to continue it, or --overwrite to start again."
        )
        raise FileExistsError(msg)
    return None, record


def run_train(args: argparse.Namespace) -> int:
    """Train MCVAE and write the model, the embedded cells and the losses."""
    from mcvi_ops.data._files import check_writable_folder

    check_writable_folder(
        args.out, what="--out", fix="Pass --out naming a folder you can write to."
    )
    lock = _run.output_lock(args.out, folder=True)
    try:
        return _train(args)
    finally:
        lock.release()


def _train(args: argparse.Namespace) -> int:
    """The steps of ``mcvi-ops train``: check, (resume and) train, embed, write, report."""
    out: Path = args.out
    resume, record = _prepare_out(args)
    adata = read_adata(args.cells, linked=not args.features)
    fingerprint, options, counts = _check_screen(adata, args)
    from mcvi_ops.model import default_feature_epochs, default_max_epochs

    default = default_feature_epochs if args.features else default_max_epochs
    max_epochs = args.max_epochs or default(adata.n_obs)
    if args.resume:
        _run.check_resumable(record, fingerprint, options, out)
        if _finished(record, resume, max_epochs, out):
            return 0
    n_control, n_perturbed = counts
    print(
        f"Training on {adata.n_obs:,} cells ({n_control:,} controls, {n_perturbed:,} perturbed, "
        f"{adata.obs[args.perturbation_key].nunique() - 1} perturbations)."
    )
    model = _model(adata, args)
    base = {"cells": str(args.cells), "n_cells": adata.n_obs, "screen": fingerprint}
    _run.write_record(out, {**base, "options": options, "status": "running"})
    start = time.perf_counter()
    _fit(model, args, max_epochs, resume)
    seconds = time.perf_counter() - start
    history, epochs = _history(model, out, resumed=resume is not None)
    if getattr(model, "_stopped_by_interrupt", False):
        _write_history(history, out)  # the losses so far, for the resumed run
        _run.write_record(
            out, {**base, "options": options, "status": "interrupted", "epochs": len(history)}
        )
        print(
            f"Training was stopped by Ctrl-C after {len(history)} epochs: nothing was written to "
            f"{out / MODEL_DIR} or {out / SCREEN_NAME}. Rerun with --resume to continue from the "
            f"checkpoint in {out / CHECKPOINT_DIR}.",
            file=sys.stderr,
        )
        return INTERRUPTED_STATUS
    name = type(model).__name__
    print(_summary(history, epochs, seconds, resumed=resume is not None, name=name) + ".")
    batch_size = max(args.batch_size, 256)
    model.get_latent_representation(adata, kind="both", batch_size=batch_size, add_to_obsm=True)
    _write_outputs(model, adata, history, out)
    _run.write_record(
        out,
        {
            **base,
            "options": options,
            "status": "finished",
            "epochs": len(history),
            "early_stopped": len(history) < max_epochs,
        },
    )
    print(f"Wrote the model to {out / MODEL_DIR} and the losses to {out / HISTORY_NAME}.")
    if not args.features:
        print(
            f"Checkpoints: {out / CHECKPOINT_DIR} (--resume with a higher --max-epochs trains "
            "longer from them; delete the folder once you no longer need to)."
        )
    keys = EMBEDDINGS[type(model).__name__]
    print(f"Embeddings ({', '.join(keys)}): {out / SCREEN_NAME}")
    return 0


def _check_screen(adata, args: argparse.Namespace) -> tuple[str, dict, tuple[int, int]]:
    """The screen's fingerprint, the run's options and the numbers of control/perturbed cells."""
    check_obs_column(adata, args.perturbation_key, "--perturbation-key", args.cells)
    columns = [args.perturbation_key]
    if args.batch_key is not None:
        check_obs_column(adata, args.batch_key, "--batch-key", args.cells)
        _check_batches(adata, args.batch_key, args.cells)
        columns.append(args.batch_key)
    for column in args.covariates or []:
        check_obs_column(adata, column, "--covariates", args.cells)
        columns.append(column)
    counts = _check_perturbations(adata, args.perturbation_key, args.control_category, args.cells)
    options = {
        "perturbation_key": args.perturbation_key,
        "control_category": args.control_category,
        "batch_key": args.batch_key,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "model": "FeatureMCVAE" if args.features else "MCVAE",
    }
    if args.features:
        options.update(layer=args.layer, covariates=args.covariates)
    fingerprint = _run.screen_fingerprint(adata, columns, features=args.features)
    return fingerprint, options, counts


def _finished(record: dict | None, resume: Path | None, max_epochs: int, out: Path) -> bool:
    """Whether ``--resume`` names a finished run that has nothing left to do (said so)."""
    done = int((record or {}).get("epochs", 0))
    if (record or {}).get("status") != "finished" or not (
        resume is None or max_epochs <= done or record.get("early_stopped")
    ):
        return False
    print(
        f"The run in {out} finished ({done} epochs): its model is {out / MODEL_DIR} and the "
        f"embedded cells {out / SCREEN_NAME}. To train longer, pass --max-epochs above "
        f"{done} with --resume; to start again, --overwrite."
    )
    return True


def _model(adata, args: argparse.Namespace):
    """MCVAE (or FeatureMCVAE, with ``--features``) set up on the cells, seeded."""
    import scvi

    from mcvi_ops import MCVAE, FeatureMCVAE

    scvi.settings.seed = args.seed
    if args.features:
        FeatureMCVAE.setup_anndata(
            adata,
            layer=args.layer,
            perturbation_key=args.perturbation_key,
            control_category=args.control_category,
            batch_key=args.batch_key,
            continuous_covariate_keys=args.covariates,
        )
        return FeatureMCVAE(adata)
    MCVAE.setup_anndata(
        adata,
        perturbation_key=args.perturbation_key,
        control_category=args.control_category,
        batch_key=args.batch_key,
    )
    return MCVAE(adata)


def _fit(model, args: argparse.Namespace, max_epochs: int, resume: Path | None) -> None:
    """Train; errors of checkpoints name the flags that fix them."""
    from mcvi_ops.train._callbacks import CheckpointWriteError

    if args.features:
        model.train(
            max_epochs=max_epochs,
            batch_size=args.batch_size,
            accelerator=args.accelerator,
            devices=args.devices,
            enable_progress_bar=not args.quiet,
        )
        return
    try:
        model.train(
            max_epochs=max_epochs,
            batch_size=args.batch_size,
            accelerator=args.accelerator,
            devices=args.devices,
            enable_progress_bar=not args.quiet,
            checkpoint_dir=args.out / CHECKPOINT_DIR,
            ckpt_path=resume,
        )
    except CheckpointWriteError as err:
        msg = (
            f"Could not write the checkpoint {str(err.checkpoint)!r}: {err.reason}; {err.kept}. "
            "Free disk space (or raise the file-size limit), then rerun with --resume to continue "
            "from the last checkpoint."
        )
        raise OSError(err.errno, msg) from err
    except RuntimeError as err:
        if resume is None or "size mismatch" not in str(err):
            raise
        msg = (
            f"The checkpoint {str(resume)!r} belongs to a run on another screen or with other "
            "options (its weights have other shapes). Pass --overwrite to start a new run in "
            f"{str(args.out)!r}, or another --out."
        )
        raise ValueError(msg) from err


def _history(model, out: Path, *, resumed: bool):
    """The losses per epoch, and how many epochs this run trained.

    A resumed run's losses follow those of the epochs before it.
    """
    import pandas as pd

    # per-epoch logs only (a model may keep other tables in its history)
    per_epoch = [v for v in model.history.values() if pd.api.types.is_integer_dtype(v.index)]
    history = (
        pd.concat(per_epoch, axis=1) if per_epoch else pd.DataFrame(index=pd.RangeIndex(0))
    ).rename_axis("epoch")
    epochs = len(history)
    if resumed and (out / HISTORY_NAME).is_file():
        # a resumed run's history starts at the checkpoint; keep the epochs before it
        before = pd.read_csv(out / HISTORY_NAME, index_col="epoch")
        if epochs:
            before = before[before.index < history.index.min()]
        history = pd.concat([before, history])
    return history, epochs


def _summary(history, epochs: int, seconds: float, *, resumed: bool, name: str = "MCVAE") -> str:
    """``Trained MCVAE for N epochs in S s; validation loss A -> B``."""
    line = f"Trained {name} for {epochs} epochs in {seconds:.0f} s"
    if resumed and epochs and len(history) > epochs:
        line = f"Trained {name} for {epochs} more epochs ({len(history)} in all) in {seconds:.0f} s"
    if "validation_loss" in history:
        valid = history["validation_loss"].dropna()
        if len(valid):
            line += f"; validation loss {float(valid.iloc[0]):,.0f} -> {float(valid.iloc[-1]):,.0f}"
    return line


def _write_outputs(model, adata, history, out: Path) -> None:
    """The model, the losses and the embedded cells, each replacing the earlier one atomically."""
    from mcvi_ops.data._link import write_h5ad

    model.save(str(out / MODEL_DIR), overwrite=True, save_anndata=False)
    _write_history(history, out)
    write_h5ad(adata, out / SCREEN_NAME)


def _write_history(history, out: Path) -> None:
    from mcvi_ops.data._files import atomic_path

    with atomic_path(out / HISTORY_NAME) as tmp:
        history.to_csv(tmp)


def run_embed(args: argparse.Namespace) -> int:
    """Embed the cells of an AnnData with a saved model."""
    if not (args.model / "model.pt").is_file():
        msg = (
            f"{str(args.model)!r} is not a saved model folder (no model.pt). Pass the model folder "
            "written by 'mcvi-ops train' (OUT/model)."
        )
        raise FileNotFoundError(msg)
    if args.out.suffix != ".h5ad":
        msg = f"--out must be an .h5ad file name, got {str(args.out)!r}."
        raise ValueError(msg)
    if args.out.is_dir():
        msg = f"--out {str(args.out)!r} is a folder; pass an .h5ad file name."
        raise IsADirectoryError(msg)
    if args.out.exists() and not args.overwrite:
        msg = f"{str(args.out)!r} already exists. Pass --overwrite to replace it, or another --out."
        raise FileExistsError(msg)
    from mcvi_ops.data._files import check_writable_folder

    check_writable_folder(
        args.out.parent, what="The folder of --out", fix="Pass --out in a folder you can write to."
    )
    lock = _run.output_lock(args.out, folder=False)
    try:
        return _embed(args)
    finally:
        lock.release()


def _saved_model_class(folder: Path):
    """The class of the model saved in ``folder``, read from its registry (which runs no code)."""
    import mcvi_ops
    from mcvi_ops._compat import MODEL_NAME_KEY

    name = mcvi_ops.MCVAE.load_registry(str(folder)).get(MODEL_NAME_KEY)
    if name not in EMBEDDINGS:
        msg = (
            f"{str(folder)!r} holds a {name} model; 'mcvi-ops embed' embeds with "
            f"{' or '.join(EMBEDDINGS)} models. Use that model's class in Python."
        )
        raise ValueError(msg)
    return getattr(mcvi_ops, name)


def _embed(args: argparse.Namespace) -> int:
    model_class = _saved_model_class(args.model)
    adata = read_adata(args.cells, linked=model_class.__name__ != "FeatureMCVAE")

    from mcvi_ops.data._link import write_h5ad

    start = time.perf_counter()
    model = model_class.load(str(args.model), adata=adata, accelerator=args.accelerator)
    model.get_latent_representation(
        adata, kind="both", batch_size=args.batch_size, add_to_obsm=True
    )
    seconds = time.perf_counter() - start
    for column in [c for c in adata.obs if c.startswith("_scvi_")]:
        del adata.obs[column]  # codes of the registration, not the user's data
    write_h5ad(adata, args.out)
    print(f"Embedded {adata.n_obs:,} cells in {seconds:.1f} s; wrote {args.out}.")
    return 0
