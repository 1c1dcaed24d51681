"""Quality of mcVAE, cVAE and VAE on a simulated screen after default training.

Trains each model with `train()` defaults on a 10k-cell synthetic screen and reports, per model:
training time, final losses, well leakage in control cells (macro-F1, salient vs background),
same-complex AUPRC of gene-level embeddings, and the novelty AUROC of the salient share.

    python benchmarks/bench_quality.py [--n-cells 10000] [--models mcvae cvae vae]
        [--train '{"lr": 1e-4}'] [--module '{"likelihood_scale": 0.2}'] [--tag name]

Writes benchmarks/results/quality[_tag].md and the learning curves as CSV.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import pandas as pd
import scvi
from _report import machine_line, markdown_table

import mcvi_ops
from mcvi_ops import MCVAE, VAE

RESULTS = Path(__file__).parent / "results"
VARIANTS = {
    "mcvae": (MCVAE, {"prior": "both"}),
    "mcvae_salient": (MCVAE, {"prior": "salient"}),
    "mcvae_background": (MCVAE, {"prior": "background"}),
    "cvae": (MCVAE, {"prior": "none"}),
    "vae": (VAE, {}),
}


def run(name, adata, train_kwargs, module_kwargs, seed):
    cls, init = VARIANTS[name]
    scvi.settings.seed = seed
    cls.setup_anndata(adata, perturbation_key="gene_symbol")
    model = cls(adata, **init, **module_kwargs)
    start = time.perf_counter()
    model.train(enable_progress_bar=False, **train_kwargs)
    seconds = time.perf_counter() - start
    history = pd.concat(
        {
            k: v.iloc[:, 0]
            for k, v in model.history.items()
            if k in ("train_loss", "validation_loss", "kl_weight")
        },
        axis=1,
    )
    if cls is MCVAE:
        adata.obsm[f"{name}_salient"] = model.get_latent_representation(kind="salient")
        adata.obsm[f"{name}_background"] = model.get_latent_representation(kind="background")
        adata.obsm[f"{name}_both"] = model.get_latent_representation(kind="both")
        reps = [f"{name}_salient", f"{name}_background", f"{name}_both"]
        pairs = {name: (f"{name}_salient", f"{name}_background")}
    else:
        adata.obsm[name] = model.get_latent_representation()
        reps, pairs = [name], {}
    return seconds, len(history), history, reps, pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=10_000)
    parser.add_argument("--models", nargs="+", default=["mcvae", "cvae", "vae"], choices=VARIANTS)
    parser.add_argument("--train", type=json.loads, default={})
    parser.add_argument("--module", type=json.loads, default={})
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    suffix = f"_{args.tag}" if args.tag else ""
    with tempfile.TemporaryDirectory() as tmp:
        adata = mcvi_ops.datasets.synthetic_screen(
            n_cells=args.n_cells, seed=0, path=Path(tmp) / "s.zarr"
        )
        rows, reps, pairs, curves = [], [], {}, {}
        for name in args.models:
            seconds, epochs, history, model_reps, model_pairs = run(
                name, adata, args.train, args.module, args.seed
            )
            curves[name] = history
            reps += model_reps
            pairs.update(model_pairs)
            last = history.iloc[-1]
            rows.append(
                {
                    "model": name,
                    "train_s": round(seconds, 1),
                    "epochs": epochs,
                    "train_loss": float(last["train_loss"]),
                    "validation_loss": float(last["validation_loss"]),
                }
            )
            print(rows[-1], flush=True)
        scores = mcvi_ops.metrics.score_synthetic_screen(
            adata, use_rep=reps, salient_background=pairs
        )
    table = scores.pivot(index="representation", columns="metric", values="value").round(3)
    runs = pd.DataFrame(rows)
    print(runs.to_string(index=False))
    print(table.to_string())
    pd.concat(curves, names=["model", "epoch"]).to_csv(RESULTS / f"quality_curves{suffix}.csv")
    text = (
        f"# Quality on the synthetic screen{f' ({args.tag})' if args.tag else ''}\n\n"
        f"Recorded {machine_line()}.\n\n"
        f"`python benchmarks/bench_quality.py --n-cells {args.n_cells} --models {' '.join(args.models)}"
        f"{' --train ' + repr(json.dumps(args.train)) if args.train else ''}"
        f"{' --module ' + repr(json.dumps(args.module)) if args.module else ''}`\n\n"
        "## Training (defaults unless stated)\n\n" + markdown_table(runs, index=False) + "\n\n"
        "## Scores\n\n" + markdown_table(table) + "\n"
    )
    (RESULTS / f"quality{suffix}.md").write_text(text)


if __name__ == "__main__":
    main()
