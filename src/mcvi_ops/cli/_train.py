"""``mcvi-ops train`` (fit MCVAE on your screen) and ``mcvi-ops embed`` (use a saved model)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from ._common import add_command, check_obs_column, read_adata

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
SCREEN_NAME = "screen.h5ad"
HISTORY_NAME = "history.csv"
CHECKPOINT_DIR = "checkpoints"
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")

_TRAIN_DESCRIPTION = """\
Train the Multi-Contrastive VAE on your own screen: CELLS is an AnnData (.h5ad) whose rows are
linked to their crops, as written by 'mcvi-ops crop' or the mcvi_ops.io readers. Writes

  OUT/model/       the trained model (mcvi_ops.MCVAE.load(OUT/model, adata))
  OUT/screen.h5ad  the cells with .obsm X_mcvae_salient, X_mcvae_background and X_mcvae
  OUT/history.csv  training and validation losses per epoch
  OUT/checkpoints/ the state after each epoch: rerun with --resume to continue a run that
                   stopped (same options; Ctrl-C stops after the current step and keeps it)

Next: 'mcvi-ops evaluate OUT/screen.h5ad --relationships ... --out ...'.
"""

_EMBED_DESCRIPTION = """\
Embed cells with a trained model: MODEL is the model folder of 'mcvi-ops train' (OUT/model) and
CELLS an AnnData linked to crops of the same channels and crop size. Writes OUT, a copy of CELLS
with .obsm X_mcvae_salient, X_mcvae_background and X_mcvae. Cells may carry perturbations the
model never saw, or none at all: the encoders do not use the label.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"expected a positive whole number, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


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
    parser.add_argument("cells", metavar="CELLS", type=Path, help="AnnData (.h5ad) linked to crops")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
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
        help="passes over the perturbed cells (default: 100,000 cells seen, 2 to 40 epochs)",
    )
    parser.add_argument(
        "--batch-size", type=_even_int, default=128, help="cells per minibatch, even (128)"
    )
    parser.add_argument(
        "--accelerator", choices=ACCELERATORS, default="auto", help="device to train on (auto)"
    )
    parser.add_argument("--devices", default="auto", help="number of devices, or 'auto'")
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
    parser.add_argument("cells", metavar="CELLS", type=Path, help="AnnData (.h5ad) linked to crops")
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


def _checkpoint(folder: Path) -> Path:
    """The checkpoint to resume from: the newer of ``interrupted.ckpt`` and ``last.ckpt``."""
    found = [p for p in (folder / "interrupted.ckpt", folder / "last.ckpt") if p.is_file()]
    if not found:
        msg = (
            f"No checkpoint to resume from in {str(folder)!r} (last.ckpt or interrupted.ckpt). "
            "Run without --resume to start training."
        )
        raise FileNotFoundError(msg)
    return max(found, key=lambda p: p.stat().st_mtime)


def run_train(args: argparse.Namespace) -> int:
    """Train MCVAE and write the model, the embedded cells and the losses."""
    out: Path = args.out
    model_dir = out / MODEL_DIR
    resume = _checkpoint(out / CHECKPOINT_DIR) if args.resume else None
    if not (args.overwrite or args.resume) and (model_dir.exists() or (out / SCREEN_NAME).exists()):
        msg = (
            f"{str(out)!r} already holds a model or {SCREEN_NAME}. Pass --overwrite to replace "
            "them, or --resume to continue that run."
        )
        raise FileExistsError(msg)
    adata = read_adata(args.cells)
    check_obs_column(adata, args.perturbation_key, "--perturbation-key", args.cells)
    if args.batch_key is not None:
        check_obs_column(adata, args.batch_key, "--batch-key", args.cells)
    n_control, n_perturbed = _check_perturbations(
        adata, args.perturbation_key, args.control_category, args.cells
    )
    print(
        f"Training on {adata.n_obs:,} cells ({n_control:,} controls, {n_perturbed:,} perturbed, "
        f"{adata.obs[args.perturbation_key].nunique() - 1} perturbations)."
    )

    import pandas as pd
    import scvi

    from mcvi_ops import MCVAE

    scvi.settings.seed = args.seed
    MCVAE.setup_anndata(
        adata,
        perturbation_key=args.perturbation_key,
        control_category=args.control_category,
        batch_key=args.batch_key,
    )
    model = MCVAE(adata)
    start = time.perf_counter()
    model.train(
        max_epochs=args.max_epochs,
        batch_size=args.batch_size,
        accelerator=args.accelerator,
        devices=args.devices if args.devices == "auto" else int(args.devices),
        enable_progress_bar=not args.quiet,
        checkpoint_dir=out / CHECKPOINT_DIR,
        ckpt_path=resume,
    )
    seconds = time.perf_counter() - start
    history = pd.concat(list(model.history.values()), axis=1).rename_axis("epoch")
    epochs = len(history)
    line = f"Trained MCVAE for {epochs} epochs in {seconds:.0f} s"
    if resume is not None and (out / HISTORY_NAME).is_file() and epochs:
        # a resumed run's history starts at the checkpoint; keep the epochs before it
        before = pd.read_csv(out / HISTORY_NAME, index_col="epoch")
        history = pd.concat([before[before.index < history.index.min()], history])
        line = f"Trained MCVAE for {epochs} more epochs ({len(history)} in all) in {seconds:.0f} s"
    if "validation_loss" in history:
        valid = history["validation_loss"].dropna()
        line += f"; validation loss {float(valid.iloc[0]):,.0f} -> {float(valid.iloc[-1]):,.0f}"
    print(line + ".")
    batch_size = max(args.batch_size, 256)
    model.get_latent_representation(adata, kind="both", batch_size=batch_size, add_to_obsm=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save(str(model_dir), overwrite=True, save_anndata=False)
    history.to_csv(out / HISTORY_NAME)
    adata.write_h5ad(out / SCREEN_NAME)
    print(f"Wrote the model to {model_dir} and the losses to {out / HISTORY_NAME}.")
    print(f"Embeddings (X_mcvae_salient, X_mcvae_background, X_mcvae): {out / SCREEN_NAME}")
    return 0


def run_embed(args: argparse.Namespace) -> int:
    """Embed the cells of an AnnData with a saved model."""
    if not (args.model / "model.pt").is_file():
        msg = (
            f"{str(args.model)!r} is not a saved model folder (no model.pt). Pass the model folder "
            "written by 'mcvi-ops train' (OUT/model)."
        )
        raise FileNotFoundError(msg)
    if args.out.exists() and not args.overwrite:
        msg = f"{str(args.out)!r} already exists. Pass --overwrite to replace it, or another --out."
        raise FileExistsError(msg)
    if args.out.suffix != ".h5ad":
        msg = f"--out must be an .h5ad file name, got {str(args.out)!r}."
        raise ValueError(msg)
    adata = read_adata(args.cells)

    from mcvi_ops import MCVAE

    setup_args = MCVAE.load_registry(str(args.model))["setup_args"]
    key, control = setup_args["perturbation_key"], setup_args["control_category"]
    added = key not in adata.obs
    if added:
        logger.info("obs has no %r column; embedding every cell as %r.", key, control)
        adata.obs[key] = control
    start = time.perf_counter()
    model = MCVAE.load(str(args.model), adata=adata, accelerator=args.accelerator)
    model.get_latent_representation(
        adata, kind="both", batch_size=args.batch_size, add_to_obsm=True
    )
    seconds = time.perf_counter() - start
    if added:
        del adata.obs[key]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(args.out)
    print(f"Embedded {adata.n_obs:,} cells in {seconds:.1f} s; wrote {args.out}.")
    return 0
