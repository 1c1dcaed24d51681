"""Benchmark `mcvi_ops.metrics.known_relationships` on 5,000 genes x 64 dimensions.

Usage: python benchmarks/bench_known_relationships.py [--n-genes 5000] [--dims 64] [--repeats 3]

Prints the timings and peak memory and writes them to benchmarks/results/metrics.md.
"""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from _report import machine_line

from mcvi_ops.metrics import known_relationships


def make_inputs(n_genes: int, dims: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    names = np.array([f"G{i:05d}" for i in range(n_genes)])
    x = rng.normal(size=(n_genes, dims)).astype(np.float32)
    # 1,100 "complexes" of 9 random genes (36 pairs each, ~40k pairs); members share a direction
    sets = {}
    for k in range(1100):
        members = rng.choice(n_genes, 9, replace=False)
        x[members] += 0.5 * rng.normal(size=(1, dims)).astype(np.float32)
        sets[f"complex{k}"] = list(names[members])
    genes = ad.AnnData(obs=pd.DataFrame(index=names))
    genes.obsm["X_emb"] = x
    return genes, sets


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-genes", type=int, default=5000)
    parser.add_argument("--dims", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    genes, sets = make_inputs(args.n_genes, args.dims)
    from mcvi_ops.metrics._readers import normalize_sources

    pairs = normalize_sources({"synthetic": sets})["synthetic"]
    n_pairs_total = args.n_genes * (args.n_genes - 1) // 2

    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        df = known_relationships(genes, use_rep="X_emb", relationships={"synthetic": pairs})
        times.append(time.perf_counter() - start)

    tracemalloc.start()
    known_relationships(genes, use_rep="X_emb", relationships={"synthetic": pairs})
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    res = df.set_index("metric")["value"].round(4).to_dict()
    lines = [
        "# Metrics benchmarks",
        "",
        "## known_relationships",
        "",
        f"- recorded: {machine_line()}",
        f"- input: {args.n_genes} genes x {args.dims} dims (random float32 with 1,100 planted "
        f"9-gene complexes), {len(pairs):,} annotated pairs, {n_pairs_total:,} gene pairs",
        f"- wall time: median {np.median(times):.2f} s, min {min(times):.2f} s over "
        f"{args.repeats} runs (one representation, one source, percentiles 5 and 10)",
        f"- peak traced memory (tracemalloc, numpy buffers): {peak / 2**20:.0f} MiB; "
        f"process max RSS: {maxrss_mb:.0f} MiB",
        f"- results: {res}",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(__file__).parent / "results" / "metrics.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
