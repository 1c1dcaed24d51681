"""mcVAE against what users would run instead, on the same simulated screen, cells and split.

One run trains mcVAE (and, on request, its ablations and the VAE), computes what a user would
otherwise pick (CellProfiler measurements of the same crops, reduced with PCA after standardising
against controls per well; PCA of arcsinh pixels; per-channel intensity statistics) and the
controls of training (the model's encoders with random weights, features before the bottleneck
reduced by PCA to the latent size; the model's own posterior means before training), aggregates
every embedding the same way (cells -> guides -> genes, minus the control mean), with and without
per-well normalisation against controls (centre-scale and TVN), and scores them all:

- same-complex average precision and 5% / 95% tail recall of gene embeddings;
- copairs mAP: phenotypic activity of each gene against controls (fraction active at FDR 5%)
  and consistency within complexes;
- technical leakage in control cells and in all cells: well (macro-F1, chance 1 / n_wells),
  field-of-view edge vs centre and well edge vs centre (AUROC, chance 0.5);
- novel-vs-shift AUROC of the salient share, and how alive the salient latent is (variance of
  perturbed cells' salient posterior means relative to the background's; active dimensions).

``--protocol crossfit`` embeds every cell with a model that never saw its guide: the guides of
each gene (and the control guides) are split in two halves, a model is trained on each half and
embeds the other (two trainings; seconds are summed). Each half is then scored on its own, every
method on the same cells, and the two folds' scores are averaged: two models have unrelated
latent coordinates, so profiles must never average guides embedded by different models.
``insample`` trains once on every cell. Model embeddings are cached beside the baselines (keyed
by method, settings and package version), so a rerun only rescores.

    python benchmarks/bench_quality.py --n-cells 10000 [--seed 0] [--difficulty hard]
        [--protocol crossfit] [--methods ...] [--tag name]

Prints the table and writes benchmarks/results/quality[_tag].md, .csv and a bar chart PNG.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _quality import (
    BASELINES,
    MODELS,
    NORMALISATIONS,
    cellprofiler_table,
    compute_baseline,
    guide_halves,
    score_table,
    simulated_screen,
    train_model,
)
from _report import machine_line, markdown_table

import mcvi_ops
from mcvi_ops import MCVAE, FeatureMCVAE

RESULTS = Path(__file__).parent / "results"


HEADLINE = {
    "AP": "average_precision",
    "consistency mAP": "consistency_mAP",
    "well F1 controls": "batch_macro_f1_controls",
    "well F1 all": "batch_macro_f1_all",
    "FOV AUROC controls": "fov_position_auroc_controls",
    "FOV AUROC all": "fov_position_auroc_all",
}


def plot_headline(scores: pd.DataFrame, path: Path) -> None:
    """Bar chart of AP and consistency mAP: models and no-training controls as they are, the
    baselines with their best normalisation (TVN)."""
    import matplotlib.pyplot as plt

    baselines = {"cellprofiler", "pixels_pca", "intensity_stats"}
    keep = np.where(
        scores["representation"].isin(baselines),
        scores["normalisation"] == "tvn",
        scores["normalisation"] == "none",
    )
    chosen = scores[keep & scores["metric"].isin(["average_precision", "consistency_mAP"])]
    chosen = chosen.dropna(subset=["value"])
    chosen = chosen.assign(
        method=[
            f"{r} ({n})" if n != "none" else r
            for r, n in zip(chosen["representation"], chosen["normalisation"], strict=True)
        ]
    )
    order = chosen[chosen["metric"] == "average_precision"].sort_values("value", ascending=False)
    fig = mcvi_ops.pl.method_comparison(
        chosen,
        metrics=("average_precision", "consistency_mAP"),
        methods=list(order["method"]),
        show=False,
        return_fig=True,
    )
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _model_cache(args, screen_key: str, method: str) -> Path:
    """Where the embeddings of one model run are kept, keyed by everything that changes them."""
    settings = json.dumps(
        [method, args.protocol, args.setup, args.model, args.train, mcvi_ops.__version__],
        sort_keys=True,
    )
    digest = hashlib.sha256(settings.encode()).hexdigest()[:12]
    return args.cache_dir / screen_key / f"model_{method}_{digest}.npz"


def _scores(adata, reps, novelty_pairs, args) -> pd.DataFrame:
    """Scores of every representation; with cross-fitting, each fold on its own, averaged.

    Under ``crossfit`` the cells of each half of the guides are embedded by the model trained on
    the other half. Two models have unrelated latent coordinates, so a gene profile averaged over
    guides of both halves would mix two spaces: each half (every gene's held-out guides and half
    of the control guides) is scored on its own, baselines on the same cells, and the two folds'
    scores are averaged.
    """
    kwargs = {"normalisations": args.normalisations, "novelty_pairs": novelty_pairs}
    if args.protocol != "crossfit":
        return score_table(adata, reps, seed=args.seed, **kwargs)
    half_a = guide_halves(adata, args.seed)
    folds = [
        score_table(adata[rows].copy(), reps, seed=args.seed, **kwargs).assign(fold=fold)
        for fold, rows in enumerate((half_a, ~half_a))
    ]
    table = pd.concat(folds)
    keys = ["representation", "metric", "normalisation"]
    return (
        table.groupby(keys, sort=False, dropna=False)["value"]
        .mean()
        .reset_index()[["representation", "metric", "value", "normalisation"]]
    )


def headline(scores, activity) -> str:
    """The numbers issue 16 checks, one row per representation and normalisation."""
    table = scores.pivot_table(
        index=["representation", "normalisation"], columns="metric", values="value"
    )
    frame = table.reindex(columns=list(HEADLINE.values())).rename(
        columns={v: k for k, v in HEADLINE.items()}
    )
    frame = frame.round(3).sort_values("AP", ascending=False)
    lines = [markdown_table(frame)]
    novelty = scores[scores["metric"] == "novelty_auroc"]
    for r in novelty.itertuples():
        lines.append(f"\nNovel vs shift AUROC ({r.representation}): {r.value:.3f}")
    for name, frame in activity.items():
        if frame is not None:
            lines.append(
                f"\nLatent activity of {name} (perturbed cells):\n\n"
                + markdown_table(frame.round(4))
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the screen and the models")
    parser.add_argument("--difficulty", choices=["standard", "hard"], default="standard")
    parser.add_argument(
        "--protocol",
        choices=["insample", "crossfit"],
        default="crossfit",
        help=(
            "train on every cell, or embed each half of the guides with a model trained on the "
            "other half and score each half on its own (the two folds' scores averaged)"
        ),
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["mcvae", "fmcvae", *BASELINES],
        choices=[*MODELS, *BASELINES],
    )
    parser.add_argument("--normalisations", nargs="+", default=list(NORMALISATIONS))
    parser.add_argument("--model", type=json.loads, default={}, help="extra model arguments")
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
    timings, novelty_pairs, reps, activity = {}, {}, [], {}
    screen_key = f"{args.difficulty}_n{args.n_cells}_seed{args.seed}"
    with tempfile.TemporaryDirectory() as tmp:
        adata = simulated_screen(
            Path(tmp) / "screen.zarr",
            n_cells=args.n_cells,
            seed=args.seed,
            difficulty=args.difficulty,
        )
        features = None
        if {"cellprofiler", "fmcvae"} & set(args.methods):
            start = time.perf_counter()
            features = cellprofiler_table(
                adata, args.cache_dir / screen_key / "cellprofiler_features.h5ad"
            )
            timings["cellprofiler_features"] = round(time.perf_counter() - start, 1)
        for method in args.methods:
            start = time.perf_counter()
            if method in MODELS:
                cached = _model_cache(args, screen_key, method)
                if cached.exists():  # the same model, settings and screen: rescore only
                    stored = np.load(cached, allow_pickle=False)
                    new = [str(k) for k in stored["keys"]]
                    for key in new:
                        adata.obsm[key] = stored[key]
                    seconds = float(stored["seconds"])
                    activity[method] = pd.read_json(
                        io.StringIO(str(stored["activity"]))
                    ).rename_axis("latent")
                else:
                    new, seconds, _, activity[method] = train_model(
                        method,
                        adata,
                        seed=args.seed,
                        protocol=args.protocol,
                        init=args.model,
                        train_kwargs=args.train,
                        features=features,
                        corrected=args.setup == "corrected",
                    )
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    np.savez(
                        cached,
                        keys=np.array(new),
                        seconds=seconds,
                        activity=(
                            activity[method].to_json() if activity[method] is not None else "{}"
                        ),
                        **{key: adata.obsm[key] for key in new},
                    )
                reps += new
                timings[method] = round(seconds, 1)
                if MODELS[method][0] in (MCVAE, FeatureMCVAE):
                    novelty_pairs[method] = (f"{method}_salient", f"{method}_background")
            else:
                # baselines are deterministic given the screen: cache them between runs
                cache = args.cache_dir / screen_key / f"{method}.npy"
                if cache.exists():
                    adata.obsm[method] = np.load(cache)
                else:
                    compute_baseline(adata, method, seed=args.seed, features=features)
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    np.save(cache, adata.obsm[method])
                reps.append(method)
                timings[method] = round(time.perf_counter() - start, 1)
            print(f"{method}: {timings[method]} s", flush=True)
        if args.baselines_only:
            return
        scores = _scores(adata, reps, novelty_pairs, args)
    for name, frame in activity.items():
        if frame is not None:
            for latent, r in frame.iterrows():
                rows = [("variance_ratio", r["variance_ratio"]), ("active_dims", r["active_dims"])]
                for metric, value in rows:
                    scores.loc[len(scores)] = (
                        f"{name}_{latent}",
                        f"{metric}",
                        float(value),
                        "none",
                    )
    table = scores.pivot_table(
        index=["representation", "normalisation"], columns="metric", values="value"
    ).round(3)
    summary = headline(scores, activity)
    print(summary)
    scores.to_csv(RESULTS / f"quality{suffix}.csv", index=False)
    command = (
        f"python benchmarks/bench_quality.py --n-cells {args.n_cells} --seed {args.seed} "
        f"--difficulty {args.difficulty} --protocol {args.protocol} "
        f"--methods {' '.join(args.methods)} --setup {args.setup}"
    )
    if args.model:
        command += f" --model '{json.dumps(args.model)}'"
    if args.train:
        command += f" --train '{json.dumps(args.train)}'"
    text = (
        f"# Quality against baselines on the simulated screen{f' ({args.tag})' if args.tag else ''}\n\n"
        f"Recorded {machine_line()}.\n\n`{command}`\n\n"
        f"Seconds per method (training, summed over folds, or feature extraction; cached "
        f"baselines 0): {json.dumps(timings)}\n\n## Headline\n\n{summary}\n\n## Every score\n\n"
        + markdown_table(table)
        + "\n"
    )
    (RESULTS / f"quality{suffix}.md").write_text(text)
    plot_headline(scores, RESULTS / f"quality{suffix}.png")


if __name__ == "__main__":
    main()
