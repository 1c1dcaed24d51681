"""``mcvi-ops demo`` (simulate, train MCVAE, embed, plot, score) and ``mcvi-ops simulate``."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

UMAP_COLORS = ("well", "fov_position", "effect_kind")


def add_parser(subparsers) -> None:
    """Add the ``demo`` sub-command."""
    parser = subparsers.add_parser(
        "demo",
        help="simulate a screen, train MCVAE, write embeddings, UMAPs and scores",
        description=(
            "The main job: simulate an optical pooled screen, train the Multi-Contrastive VAE "
            "with its defaults, write the AnnData with salient and background embeddings, UMAP "
            "PNGs, the model and a table of scores against the simulation's ground truth."
        ),
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="Output folder.")
    parser.add_argument("--n-cells", type=int, default=10_000, help="Cells to simulate.")
    parser.add_argument("--n-genes", type=int, default=60, help="Genes to simulate.")
    parser.add_argument("--crop-size", type=int, default=64, help="Crop size in pixels.")
    parser.add_argument("--max-epochs", type=int, default=None, help="Default: a heuristic.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of simulation and training.")
    parser.add_argument(
        "--format", choices=("h5ad", "zarr"), default="h5ad", help="AnnData file format."
    )
    parser.set_defaults(func=run)


def add_simulate_parser(subparsers) -> None:
    """Add the ``simulate`` sub-command."""
    parser = subparsers.add_parser(
        "simulate",
        help="write a simulated screen (crop store + AnnData) to disk",
        description="Simulate an optical pooled screen and write its crops and AnnData.",
    )
    parser.add_argument("--out", type=Path, required=True, help="Output folder.")
    parser.add_argument("--n-cells", type=int, default=10_000, help="Cells to simulate.")
    parser.add_argument("--n-genes", type=int, default=60, help="Genes to simulate.")
    parser.add_argument("--crop-size", type=int, default=64, help="Crop size in pixels.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the simulation.")
    parser.add_argument("--overwrite", action="store_true", help="Replace existing outputs.")
    parser.set_defaults(func=run_simulate)


def _simulate(out: Path, *, n_cells: int, n_genes: int, crop_size: int, seed: int, overwrite: bool):
    from mcvi_ops.datasets import synthetic_screen

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    adata = synthetic_screen(
        n_cells=n_cells,
        n_genes=n_genes,
        crop_size=crop_size,
        seed=seed,
        path=out / "crops.zarr",
        overwrite=overwrite,
    )
    seconds = time.perf_counter() - start
    truth = adata.uns["ground_truth"]
    print(
        f"Simulated {adata.n_obs:,} cells ({n_cells / seconds:,.0f} cells/s): "
        f"{adata.obs['gene_symbol'].nunique() - 1} genes, {adata.obs['sgRNA'].nunique()} guides, "
        f"{adata.obs['well'].nunique()} wells, {crop_size}x{crop_size} px crops in {out / 'crops.zarr'}"
    )
    print(
        "Genes per effect kind: "
        + ", ".join(
            f"{kind} {count}" for kind, count in truth["effect_kind"].value_counts().items()
        )
    )
    return adata


def _locked(command):
    """Run ``command(args)`` holding the lock of ``args.out`` (one writer per output folder)."""

    def run(args: argparse.Namespace) -> int:
        from ._run import output_lock

        lock = output_lock(args.out, folder=True)
        try:
            return command(args)
        finally:
            lock.release()

    run.__doc__ = command.__doc__
    return run


@_locked
def run_simulate(args: argparse.Namespace) -> int:
    """Simulate a screen and write it to ``args.out``."""
    adata = _simulate(
        args.out,
        n_cells=args.n_cells,
        n_genes=args.n_genes,
        crop_size=args.crop_size,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    from mcvi_ops.data._link import write_h5ad

    write_h5ad(adata, args.out / "screen.h5ad")
    print(f"Wrote {args.out / 'screen.h5ad'}")
    return 0


def _umaps(adata, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mcvi_ops import pl, tl
    from mcvi_ops.data._files import atomic_path

    paths = []
    reps = ("X_mcvae_salient", "X_mcvae_background")
    tl.umaps(adata, use_rep=reps)
    for color in UMAP_COLORS:
        fig, axs = plt.subplots(1, 2, figsize=(11, 4.5))
        pl.salient_background(adata, color=color, reps=reps, axs=axs, frameon=False)
        fig.suptitle(f"MCVAE latent spaces coloured by {color}")
        fig.tight_layout()
        path = out / f"umap_{color}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        paths.append(path)
    return paths


@_locked
def run(args: argparse.Namespace) -> int:
    """Simulate, train, embed, plot and score; see ``mcvi-ops demo --help``."""
    import scvi

    from mcvi_ops import MCVAE, metrics, pp
    from mcvi_ops.data._files import atomic_path
    from mcvi_ops.data._link import write_h5ad

    total = time.perf_counter()
    out: Path = args.out
    adata = _simulate(
        out,
        n_cells=args.n_cells,
        n_genes=args.n_genes,
        crop_size=args.crop_size,
        seed=args.seed,
        overwrite=True,
    )
    scvi.settings.seed = args.seed
    MCVAE.setup_anndata(adata, perturbation_key="gene_symbol", control_category="nontargeting")
    model = MCVAE(adata)
    start = time.perf_counter()
    model.train(max_epochs=args.max_epochs)
    train_s = time.perf_counter() - start
    history = model.history
    epochs = len(history["train_loss"])
    print(
        f"Trained MCVAE for {epochs} epochs in {train_s:.0f} s; validation loss "
        f"{float(history['validation_loss'].iloc[0, 0]):,.0f} -> "
        f"{float(history['validation_loss'].iloc[-1, 0]):,.0f}"
    )
    start = time.perf_counter()
    model.get_latent_representation(kind="both", add_to_obsm=True)  # all three embeddings
    print(f"Embedded {adata.n_obs:,} cells in {time.perf_counter() - start:.1f} s")
    pp.derive_covariates(adata)
    for path in _umaps(adata, out):
        print(f"Wrote {path}")
    scores = metrics.score_synthetic_screen(
        adata,
        use_rep=["X_mcvae_salient", "X_mcvae_background", "X_mcvae"],
        salient_background={"X_mcvae": ("X_mcvae_salient", "X_mcvae_background")},
    )
    table = scores.pivot(index="representation", columns="metric", values="value")
    with atomic_path(out / "scores.csv") as tmp:
        table.to_csv(tmp)
    print("Scores against the simulation's ground truth:")
    print(table.round(3).to_string())
    model.save(out / "model", overwrite=True)
    name = "screen.h5ad" if args.format == "h5ad" else "screen.anndata.zarr"
    for key in list(adata.uns):
        if key.startswith("neighbors_"):  # graphs are large and cheap to recompute
            del adata.uns[key]
    for key in list(adata.obsp):
        del adata.obsp[key]
    if args.format == "h5ad":
        write_h5ad(adata, out / name)
    else:
        with atomic_path(out / name, folder=True) as tmp:
            adata.write_zarr(tmp)
    print(f"Wrote {out / name} and {out / 'model'}")
    print(f"Done in {time.perf_counter() - total:.0f} s")
    return 0
