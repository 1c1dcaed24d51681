"""FeatureMCVAE at screen scale: training time with the defaults, and memory from 10k to 1 M cells.

Two measurements on a simulated cells x features table (float32; gene effects on a fifth of the
features, per-well offsets and scales, a field-of-view distance covariate):

1. ``time``: ``FeatureMCVAE(...).train()`` with its defaults on 10,000 cells (issue 17: under
   2 minutes on a 2-core CPU), with the epochs it ran;
2. ``memory``: for each size, a fresh process builds the table, then runs set-up (control
   standardisation statistics), a fixed number of training steps, the embedding of every cell
   and ``tl.aggregate``, while a thread samples its resident memory. The table and the
   embeddings a user keeps must grow with the screen; peak RSS minus them should stay flat.

Run::

    python benchmarks/bench_features.py                       # time, then 10k / 100k / 1M
    python benchmarks/bench_features.py --sizes 10000 100000  # quicker

Writes ``benchmarks/results/features.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench_memory import _per_cell_bytes, _rss_bytes, _Sampler

HERE = Path(__file__).parent
STAGES = ["table", "setup", "train", "embed", "aggregate"]


def _table(n_cells: int, n_features: int, seed: int = 0, block: int = 100_000):
    """A simulated feature table, built block by block in float32."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    n_genes = 200
    code = rng.integers(0, n_genes, n_cells)
    code[rng.random(n_cells) < 0.2] = n_genes  # controls
    genes = np.where(code == n_genes, "nontargeting", np.char.add("G", code.astype(str)))
    wells = rng.integers(0, 12, n_cells)
    effects = rng.normal(0, 1, (n_genes + 1, n_features)).astype(np.float32)
    effects[:, rng.random(n_features) > 0.2] = 0
    effects[-1] = 0  # controls
    offset = rng.normal(0, 2, (12, n_features)).astype(np.float32)
    scale = rng.uniform(0.5, 2, (12, n_features)).astype(np.float32)
    x = np.empty((n_cells, n_features), dtype=np.float32)
    for start in range(0, n_cells, block):
        rows = slice(start, min(start + block, n_cells))
        values = rng.standard_normal((rows.stop - rows.start, n_features), dtype=np.float32)
        values += effects[code[rows]]
        x[rows] = values * scale[wells[rows]] + offset[wells[rows]]
    obs = pd.DataFrame(
        {
            "gene_symbol": pd.Categorical(genes),
            "sgRNA": pd.Categorical(
                np.char.add(genes, np.char.add("_g", rng.integers(0, 4, n_cells).astype(str)))
            ),
            "batch": pd.Categorical(wells.astype(str)),
            "fov_distance": rng.random(n_cells).astype(np.float32),
        },
        index=pd.RangeIndex(n_cells).astype(str),
    )
    return ad.AnnData(x, obs=obs)


def _setup(adata):
    import mcvi_ops

    mcvi_ops.FeatureMCVAE.setup_anndata(
        adata,
        perturbation_key="gene_symbol",
        control_category="nontargeting",
        batch_key="batch",
        continuous_covariate_keys=["fov_distance"],
    )
    return mcvi_ops.FeatureMCVAE(adata)


def _time_default(n_cells: int, n_features: int) -> dict:
    import scvi

    scvi.settings.seed = 0
    adata = _table(n_cells, n_features)
    model = _setup(adata)
    start = time.perf_counter()
    model.train(enable_progress_bar=False)
    seconds = time.perf_counter() - start
    epochs = len(model.history["train_loss"])
    return {"n_cells": n_cells, "n_features": n_features, "seconds": seconds, "epochs": epochs}


def _run_one(n_cells: int, n_features: int, steps: int, out: Path) -> None:
    sampler = _Sampler()
    import scvi

    import mcvi_ops

    scvi.settings.seed = 0
    baseline = _rss_bytes()
    sampler.enter("table")
    adata = _table(n_cells, n_features)
    sampler.enter("setup")
    model = _setup(adata)
    sampler.enter("train")
    model.train(max_epochs=1, max_steps=steps, early_stopping=False, enable_progress_bar=False)
    sampler.enter("embed")
    model.get_latent_representation(kind="both", add_to_obsm=True)
    sampler.enter("aggregate")
    mcvi_ops.tl.aggregate(adata, use_rep="X_fmcvae")
    sampler.close()
    record = {
        "n_cells": n_cells,
        "baseline_bytes": baseline,
        "per_cell_bytes": _per_cell_bytes(adata),
        "peaks": sampler.peaks,
        "seconds": sampler.seconds,
    }
    out.write_text(json.dumps(record))


def _report(timing: dict | None, records: list[dict], args) -> str:
    import torch

    machine = (
        f"{time.strftime('%Y-%m-%d')}, {platform.system()} {platform.machine()}, "
        f"{__import__('os').cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )
    lines = ["# FeatureMCVAE: training time and memory", "", f"Recorded {machine}.", ""]
    lines += [f"`python benchmarks/bench_features.py {' '.join(sys.argv[1:])}`".rstrip(), ""]
    if timing:
        lines += [
            f"Training with the defaults on {timing['n_cells']:,} cells x "
            f"{timing['n_features']} features: {timing['seconds']:.0f} s, "
            f"{timing['epochs']} epochs (early stopping included).",
            "",
        ]
    if records:
        mib = 2**20
        lines += [
            "| cells | kept arrays (MiB) | "
            + " | ".join(f"peak {s} - kept (MiB)" for s in STAGES)
            + " | seconds |",
            "| --- | --- | " + " | ".join("---" for _ in STAGES) + " | --- |",
        ]
        for r in records:
            kept = r["per_cell_bytes"]
            peaks = " | ".join(f"{(r['peaks'].get(s, 0) - kept) / mib:,.0f}" for s in STAGES)
            seconds = sum(r["seconds"].get(s, 0) for s in STAGES)
            lines.append(f"| {r['n_cells']:,} | {kept / mib:,.0f} | {peaks} | {seconds:.0f} |")
        lines += [
            "",
            f"Kept arrays: the table (.X, {args.n_features} float32 features), .obs and the "
            "embeddings in .obsm, which must grow with the screen. Peak resident memory minus "
            f"them, per stage; training runs {args.steps} steps at every size.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--n-features", type=int, default=500)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--no-time", action="store_true", help="skip the timing of the defaults")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        _run_one(args.one, args.n_features, args.steps, args.record)
        return
    timing = None if args.no_time else _time_default(10_000, args.n_features)
    if timing:
        print(f"default training, 10k cells: {timing['seconds']:.0f} s, {timing['epochs']} epochs")
    records = []
    for n in args.sizes:
        record = HERE / "results" / f".features_n{n}.json"
        cmd = [sys.executable, __file__, "--one", str(n), "--record", str(record)]
        cmd += ["--n-features", str(args.n_features), "--steps", str(args.steps)]
        subprocess.run(cmd, check=True)
        records.append(json.loads(record.read_text()))
        record.unlink()
        print(json.dumps(records[-1]["peaks"]), flush=True)
    text = _report(timing, records, args)
    (HERE / "results" / "features.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
