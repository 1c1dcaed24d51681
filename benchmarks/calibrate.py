"""Calibration study of the mcVAE objective: one training run per call, recorded as a JSON line.

Protocol (held-out guides, as issue 16 asks): the guides of every gene, and the control guides,
are split in two halves at random (seeded by the screen seed). The model trains on the cells of
half A only and embeds every cell; gene profiles, leakage and novelty are scored on the cells of
half B, guides the model never saw, so neither the per-perturbation priors nor a classifier can
score by remembering its training labels. Baselines and controls are scored on the same B cells:

- ``cellprofiler``: CellProfiler measurements of the crops (``tl.cellprofiler_features``), PCA64;
- ``pixels_pca``: PCA64 of arcsinh pixels;
- ``intensity_stats``: per channel mean, standard deviation and fraction of pixels above the
  controls' 90th percentile, of intensity-corrected arcsinh crops (12 features);
- ``random_encoder``: the model's two convolutional encoders with random weights, their
  flattened features before the bottleneck (PCA to the latent size);
- ``untrained``: the model's own posterior means before any training;

each raw and normalised against the controls of each well (centre-scale, TVN).

    python benchmarks/calibrate.py run --name defaults [--module JSON] [--train JSON]
        [--screen standard|hard] [--n-cells 8000] [--screen-seed 0] [--seed 0]
    python benchmarks/calibrate.py baselines [--screen ...] [--n-cells ...]
    python benchmarks/calibrate.py report

Runs are appended to ``benchmarks/results/calibration_runs.jsonl``; ``report`` renders
``benchmarks/results/calibration.md`` from it. Screens and baseline embeddings are cached under
``~/.cache/mcvi-ops-bench``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import anndata as ad
import numpy as np
from _quality import (
    BASELINES,
    CONTROL,
    GENE,
    NORMALISATIONS,
    cellprofiler_table,
    compute_baseline,
    fit_and_embed,
    fov_distance,
    guide_halves,
    score_table,
    simulated_screen,
)
from _report import machine_line

RESULTS = Path(__file__).parent / "results"
# runs from a frozen copy of the code (see the module docstring) still record here
RUNS = Path(os.environ.get("MCVI_CALIBRATION_RUNS", RESULTS / "calibration_runs.jsonl"))
CACHE = Path.home() / ".cache" / "mcvi-ops-bench"


# --- screens and baselines ------------------------------------------------------------------
def load_screen(difficulty: str, n_cells: int, seed: int) -> ad.AnnData:
    """A simulated screen with covariates and intensity factors, cached on disk."""
    folder = CACHE / "screens" / f"{difficulty}_n{n_cells}_seed{seed}"
    h5ad = folder / "screen.h5ad"
    if not h5ad.exists():
        folder.mkdir(parents=True, exist_ok=True)
        simulated_screen(
            folder / "screen.zarr", n_cells=n_cells, seed=seed, difficulty=difficulty
        ).write_h5ad(h5ad)
    return ad.read_h5ad(h5ad)


def baselines(adata: ad.AnnData, key: str, *, seed: int) -> list[str]:
    """Every baseline embedding of the screen, cached per screen."""
    folder = CACHE / "baselines" / key
    folder.mkdir(parents=True, exist_ok=True)
    for name in BASELINES:
        path = folder / f"{name}.npy"
        if path.exists():
            adata.obsm[name] = np.load(path)
            continue
        start = time.perf_counter()
        features = None
        if name == "cellprofiler":
            features = cellprofiler_table(adata, folder / "cellprofiler_features.h5ad")
        compute_baseline(adata, name, seed=seed, features=features)
        np.save(path, adata.obsm[name])
        if name in ("random_encoder", "untrained"):  # computed together
            for other in ("random_encoder", "untrained"):
                np.save(folder / f"{other}.npy", adata.obsm[other])
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    return list(BASELINES)


# --- the model under calibration ------------------------------------------------------------
def train_on_half(adata, half_a, *, name, seed, module_kwargs, train_kwargs, key, setup=None):
    """Train model ``name`` on the cells of half A; embed every cell; return seconds, curves."""
    source = adata
    if name == "hybrid":
        table = cellprofiler_table(adata, CACHE / "baselines" / key / "cellprofiler_features.h5ad")
        adata.obsm["cellprofiler_features"] = np.asarray(table.X, dtype=np.float32)
    if name == "fmcvae":
        source = cellprofiler_table(adata, CACHE / "baselines" / key / "cellprofiler_features.h5ad")
        source.obs = adata.obs.copy()
        source.obs["fov_distance"] = fov_distance(adata)
    both, seconds, model = fit_and_embed(
        name,
        source[half_a].copy(),
        source,
        seed=seed,
        init=module_kwargs,
        train_kwargs=train_kwargs,
        setup=setup,
    )
    n_salient = model.module.n_salient_latent
    adata.obsm["mcvae_both"] = both
    adata.obsm["mcvae_salient"] = both[:, :n_salient]
    adata.obsm["mcvae_background"] = both[:, n_salient:]
    curves = {
        key: [round(float(v), 4) for v in frame.iloc[:, 0].to_numpy()]
        for key, frame in model.history.items()
        if frame.ndim == 2 and frame.shape[1] == 1 and key != "kl_global_train"
    }
    return seconds, curves, model


def health(adata, mask) -> dict[str, float]:
    """How alive the salient latent is, on perturbed cells of ``mask``."""
    perturbed = mask & (adata.obs[GENE] != CONTROL).to_numpy()
    var_s = adata.obsm["mcvae_salient"][perturbed].var(axis=0)
    var_z = adata.obsm["mcvae_background"][perturbed].var(axis=0)
    return {
        "salient_variance": float(var_s.mean()),
        "background_variance": float(var_z.mean()),
        "variance_ratio": float(var_s.mean() / max(var_z.mean(), 1e-12)),
        "active_salient": int((var_s > 0.01).sum()),
        "active_background": int((var_z > 0.01).sum()),
    }


def score_half(adata, mask, reps, *, novelty, seed, normalisations):
    """Scores of the representations on the cells of ``mask``, as {rep/norm: {metric: value}}."""
    scores = score_table(
        adata[mask].copy(), reps, normalisations=normalisations, novelty_pairs=novelty, seed=seed
    )
    out: dict[str, dict[str, float]] = {}
    for r in scores.itertuples():
        out.setdefault(f"{r.representation}/{r.normalisation}", {})[r.metric] = round(r.value, 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "baselines", "report"])
    parser.add_argument("--name", default="defaults")
    parser.add_argument("--screen", choices=["standard", "hard"], default="standard")
    parser.add_argument("--n-cells", type=int, default=8000)
    parser.add_argument("--screen-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the model")
    parser.add_argument("--model", choices=["mcvae", "fmcvae", "hybrid"], default="mcvae")
    parser.add_argument("--module", type=json.loads, default={}, help="MCVAE(...) arguments")
    parser.add_argument(
        "--setup", type=json.loads, default=None, help="setup_anndata() arguments instead"
    )
    parser.add_argument("--train", type=json.loads, default={}, help="train() arguments")
    parser.add_argument("--normalisations", nargs="+", default=["none"])
    parser.add_argument("--seen", action="store_true", help="also score the training half")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.command == "report":
        from calibration_report import write_report

        write_report(RUNS, RESULTS / "calibration.md")
        return
    key = f"{args.screen}_n{args.n_cells}_seed{args.screen_seed}"
    adata = load_screen(args.screen, args.n_cells, args.screen_seed)
    half_a = guide_halves(adata, args.screen_seed)
    if args.command == "baselines":
        names = baselines(adata, key, seed=args.screen_seed)
        scores = score_half(
            adata, ~half_a, names, novelty={}, seed=0, normalisations=list(NORMALISATIONS)
        )
        (CACHE / "baselines" / key / "scores.json").write_text(json.dumps(scores, indent=1))
        record = {"name": "baselines", "screen": key, "machine": machine_line(), "heldout": scores}
        with RUNS.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        for rep, values in scores.items():
            print(rep, {k: values.get(k) for k in ("average_precision", "consistency_mAP")})
        return
    seconds, curves, model = train_on_half(
        adata,
        half_a,
        name=args.model,
        seed=args.seed,
        module_kwargs=args.module,
        train_kwargs=args.train,
        key=key,
        setup=args.setup,
    )
    reps = ["mcvae_both", "mcvae_salient", "mcvae_background"]
    novelty = {"mcvae": ("mcvae_salient", "mcvae_background")}
    record = {
        "name": args.name,
        "model": args.model,
        "screen": key,
        "seed": args.seed,
        "module": args.module,
        "train": args.train,
        "setup": args.setup,
        "train_seconds": round(seconds, 1),
        "epochs": int(model.history["train_loss"].shape[0]),
        "machine": machine_line(),
        "curves": curves,
        "health": health(adata, ~half_a),
        "heldout": score_half(
            adata, ~half_a, reps, novelty=novelty, seed=0, normalisations=args.normalisations
        ),
    }
    if args.seen:
        record["seen"] = score_half(
            adata, half_a, reps, novelty=novelty, seed=0, normalisations=["none"]
        )
    with RUNS.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    h = record["heldout"]
    print(
        json.dumps(
            {
                "name": args.name,
                "s": record["train_seconds"],
                "ap_both": h["mcvae_both/none"].get("average_precision"),
                "ap_salient": h["mcvae_salient/none"].get("average_precision"),
                "ap_background": h["mcvae_background/none"].get("average_precision"),
                "cons_both": h["mcvae_both/none"].get("consistency_mAP"),
                **record["health"],
                "novelty": h["mcvae/none"].get("novelty_auroc"),
            }
        )
    )


if __name__ == "__main__":
    main()
