"""mcVAE against what users would run instead, on the same simulated screen, cells and split.

One run trains mcVAE (and, on request, its ablations and the VAE), computes the two baselines a
user would otherwise pick (CellProfiler measurements of the same crops, reduced with PCA after
standardising against controls per well, and PCA of arcsinh pixels), aggregates every embedding
the same way (cells -> guides -> genes, minus the control mean), with and without per-well
normalisation against controls (centre-scale and TVN), and scores them all:

- same-complex average precision and 5% / 95% tail recall of gene embeddings;
- copairs mAP: phenotypic activity of each gene against controls (fraction active at FDR 5%)
  and consistency within complexes;
- technical leakage in control cells and in all cells: well (macro-F1, chance 1 / n_wells),
  field-of-view edge vs centre and well edge vs centre (AUROC, chance 0.5);
- novel-vs-shift AUROC of the salient share (mcVAE only).

    python benchmarks/bench_quality.py --n-cells 10000 [--seed 0] [--methods ...] [--tag name]

Prints the table and writes benchmarks/results/quality[_tag].md, .csv and a bar chart PNG.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scvi
from _report import machine_line, markdown_table
from sklearn.decomposition import PCA

import mcvi_ops
from mcvi_ops import MCVAE, VAE
from mcvi_ops.metrics._synthetic import novelty_auroc

RESULTS = Path(__file__).parent / "results"
MODELS = {
    "mcvae": (MCVAE, {"prior": "both"}),
    "mcvae_prior_salient": (MCVAE, {"prior": "salient"}),
    "mcvae_prior_background": (MCVAE, {"prior": "background"}),
    "cvae": (MCVAE, {"prior": "none"}),
    "vae": (VAE, {}),
}
BASELINES = ("cellprofiler", "pixels_pca")
NORMALISATIONS = ("none", "center_scale", "tvn")
GUIDE, GENE, CONTROL = "sgRNA", "gene_symbol", "nontargeting"


def train_model(name, adata, *, seed, train_kwargs, corrected=True):
    """Train one model with its defaults; returns {representation: obsm key} and seconds."""
    cls, init = MODELS[name]
    scvi.settings.seed = seed
    setup = {}
    if corrected:
        # the recommended set-up: the well as batch covariate, and crops divided by intensity
        # factors (illumination x well gains) estimated from the controls
        if "intensity_factors" not in adata.obsm:
            mcvi_ops.pp.estimate_intensity_factors(adata, batch_key="batch", seed=seed)
        setup = {"batch_key": "batch", "intensity_factor_key": "intensity_factors"}
    cls.setup_anndata(adata, perturbation_key=GENE, control_category=CONTROL, **setup)
    model = cls(adata, **init)
    start = time.perf_counter()
    model.train(enable_progress_bar=False, **train_kwargs)
    seconds = time.perf_counter() - start
    if cls is VAE:
        adata.obsm[name] = model.get_latent_representation()
        return {name: name}, seconds, model
    # one pass over the store: "both" is the salient then the background columns
    both = model.get_latent_representation(kind="both")
    n_salient = model.module.n_salient_latent
    parts = {"both": both, "salient": both[:, :n_salient], "background": both[:, n_salient:]}
    reps = {}
    for kind, values in parts.items():
        adata.obsm[f"{name}_{kind}"] = values
        reps[f"{name}_{kind}"] = f"{name}_{kind}"
    return reps, seconds, model


def pixels_pca(adata, *, n_comps=64, fit_cells=5_000, seed=0):
    """PCA of arcsinh-transformed pixels, fitted on a sample and applied chunk by chunk."""
    store = mcvi_ops.data.linked_store(adata)
    index = adata.obs[adata.uns["crops"]["index_key"]].to_numpy()
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(adata.n_obs, min(fit_cells, adata.n_obs), replace=False))

    def flat(rows):
        return np.arcsinh(store.take(index[rows]).astype(np.float32)).reshape(len(rows), -1)

    pca = PCA(n_components=n_comps, svd_solver="randomized", random_state=seed)
    pca.fit(flat(sample))
    parts = [
        pca.transform(flat(np.arange(a, min(a + 2048, adata.n_obs))))
        for a in range(0, adata.n_obs, 2048)
    ]
    adata.obsm["pixels_pca"] = np.concatenate(parts).astype(np.float32)


def cellprofiler(adata, *, n_comps=64, seed=0):
    """CellProfiler measurements of the same crops -> PCA (normalisation is applied later)."""
    features = mcvi_ops.tl.cellprofiler_features(adata, progress=False)
    x = np.asarray(features.X, dtype=np.float64)
    keep = np.isfinite(x).all(axis=0) & (np.nanstd(x, axis=0) > 0)
    x = x[:, keep]
    bad = ~np.isfinite(x).all(axis=1)
    x[bad] = 0.0
    x = (x - x.mean(0)) / x.std(0)
    n = min(n_comps, x.shape[1], x.shape[0] - 1)
    adata.obsm["cellprofiler"] = PCA(n, random_state=seed).fit_transform(x).astype(np.float32)
    return features.n_vars, int(keep.sum()), int(bad.sum())


def normalised(adata, reps, methods):
    """Add per-well control-normalised copies of each representation; returns the new keys."""
    out = {}
    for rep in reps:
        for method in methods:
            if method == "none":
                out[rep] = (rep, "none")
                continue
            key = f"{rep}__{method}"
            mcvi_ops.tl.normalize_to_controls(
                adata,
                use_rep=rep,
                batch_key="batch",
                perturbation_key=GENE,
                control_category=CONTROL,
                method=method,
                key_added=key,
            )
            out[key] = (rep, method)
    return out


def score(adata, keys, *, novelty_pairs, seed):
    """Every score for every representation, as a tidy table."""
    rows = []
    reps = list(keys)
    complexes = adata.uns["synthetic_screen"]["complexes"]  # shipped with the screen
    genes = mcvi_ops.tl.aggregate(adata, use_rep=reps, by=(GUIDE, GENE), control_category=CONTROL)
    guides = mcvi_ops.tl.aggregate(
        adata,
        use_rep=reps,
        by=(GUIDE, GENE),
        level="guide",
        control_category=CONTROL,
        keep_controls=True,
    )
    known = mcvi_ops.metrics.known_relationships(
        genes, use_rep=reps, relationships={"complexes": complexes}, min_pairs=5
    )
    for _, r in known.iterrows():
        rows.append((r["representation"], r["metric"], float(r["value"])))
    activity = mcvi_ops.metrics.phenotypic_activity(
        guides, use_rep=reps, perturbation_key=GENE, control_category=CONTROL, seed=seed
    )
    consistency = mcvi_ops.metrics.phenotypic_consistency(
        genes, use_rep=reps, relationships={"complexes": complexes}, seed=seed
    )
    for frame, name, flag in (
        (activity, "activity", "active"),
        (consistency, "consistency", "consistent"),
    ):
        summary = frame.groupby("representation").agg(
            mAP=("mean_average_precision", "mean"), active=(flag, "mean")
        )
        for rep, r in summary.iterrows():
            rows.append((rep, f"{name}_mAP", float(r["mAP"])))
            rows.append((rep, f"{name}_fraction_significant", float(r["active"])))
    for controls_only in (True, False):
        leak = mcvi_ops.metrics.technical_covariates(
            adata, use_rep=reps, controls_only=controls_only, seed=seed
        )
        where = "controls" if controls_only else "all"
        for _, r in leak.iterrows():
            metric = "macro_f1" if r["covariate"] == "batch" else "auroc"
            rows.append(
                (r["representation"], f"{r['covariate']}_{metric}_{where}", float(r[metric]))
            )
    for name, (salient, background) in novelty_pairs.items():
        auroc = novelty_auroc(
            adata, salient_rep=salient, background_rep=background, n_permutations=200, seed=seed
        )
        rows.append((name, "novelty_auroc", auroc))
    return pd.DataFrame(rows, columns=["representation", "metric", "value"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the screen and the models")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["mcvae", "vae", *BASELINES],
        choices=[*MODELS, *BASELINES],
    )
    parser.add_argument("--normalisations", nargs="+", default=list(NORMALISATIONS))
    parser.add_argument("--train", type=json.loads, default={}, help="extra train() arguments")
    parser.add_argument(
        "--setup",
        choices=["corrected", "plain"],
        default="corrected",
        help="models set up with the well as batch and intensity factors (recommended) or plain",
    )
    parser.add_argument("--tag", default="")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path.home() / ".cache" / "mcvi-ops-bench",
        help="where baseline embeddings are kept between runs",
    )
    parser.add_argument("--baselines-only", action="store_true", help="compute and cache only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    suffix = f"_{args.tag}" if args.tag else ""
    timings, novelty_pairs, base_reps = {}, {}, []
    with tempfile.TemporaryDirectory() as tmp:
        adata = mcvi_ops.datasets.synthetic_screen(
            n_cells=args.n_cells, seed=args.seed, path=Path(tmp) / "screen.zarr"
        )
        mcvi_ops.pp.derive_covariates(adata)
        for method in args.methods:
            start = time.perf_counter()
            if method in MODELS:
                reps, seconds, _ = train_model(
                    method,
                    adata,
                    seed=args.seed,
                    train_kwargs=args.train,
                    corrected=args.setup == "corrected",
                )
                base_reps += list(reps)
                if MODELS[method][0] is MCVAE:
                    novelty_pairs[method] = (f"{method}_salient", f"{method}_background")
            else:
                # baselines are deterministic given the screen: cache them between runs
                cache = args.cache_dir / f"{method}_n{args.n_cells}_seed{args.seed}.npy"
                if cache.exists():
                    adata.obsm[method] = np.load(cache)
                elif method == "pixels_pca":
                    pixels_pca(adata, seed=args.seed)
                else:
                    n_features, n_kept, n_failed = cellprofiler(adata, seed=args.seed)
                    print(f"cellprofiler: {n_features} features ({n_kept} kept), {n_failed} failed")
                args.cache_dir.mkdir(parents=True, exist_ok=True)
                np.save(cache, adata.obsm[method])
                base_reps.append(method)
            timings[method] = round(time.perf_counter() - start, 1)
            print(f"{method}: {timings[method]} s", flush=True)
        if args.baselines_only:
            return
        keys = normalised(adata, base_reps, args.normalisations)
        scores = score(adata, keys, novelty_pairs=novelty_pairs, seed=args.seed)
    scores["normalisation"] = scores["representation"].map(lambda k: keys.get(k, (k, "none"))[1])
    scores["representation"] = scores["representation"].map(lambda k: keys.get(k, (k, "none"))[0])
    table = scores.pivot_table(
        index=["representation", "normalisation"], columns="metric", values="value"
    ).round(3)
    print(table.to_string())
    scores.to_csv(RESULTS / f"quality{suffix}.csv", index=False)
    text = (
        f"# Quality against baselines on the simulated screen{f' ({args.tag})' if args.tag else ''}\n\n"
        f"Recorded {machine_line()}.\n\n"
        f"`python benchmarks/bench_quality.py --n-cells {args.n_cells} --seed {args.seed} "
        f"--methods {' '.join(args.methods)} --setup {args.setup}`\n\n"
        f"Seconds per method (training or feature extraction): {json.dumps(timings)}\n\n"
        + markdown_table(table)
        + "\n"
    )
    (RESULTS / f"quality{suffix}.md").write_text(text)
    try:
        comparison = scores[scores["metric"].isin(["average_precision", "consistency_mAP"])]
        fig = mcvi_ops.pl.method_comparison(
            comparison.assign(
                method=comparison["representation"] + " / " + comparison["normalisation"]
            ),
            metrics=("average_precision", "consistency_mAP"),
            show=False,
            return_fig=True,
        )
        fig.savefig(RESULTS / f"quality{suffix}.png", dpi=120, bbox_inches="tight")
    except (AttributeError, TypeError, KeyError) as err:  # the plot is optional in this script
        print(f"no figure: {err}")


if __name__ == "__main__":
    main()
