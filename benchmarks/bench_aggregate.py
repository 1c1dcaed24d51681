"""Benchmark group means: our sparse-indicator `group_means` vs `scanpy.get.aggregate`.

Usage: python benchmarks/bench_aggregate.py [--sizes 100000 1000000] [--dims 64] [--groups 20000]

For each number of cells, times (best of ``--repeats``) the mean of every group of rows of a
random float32 embedding, ``--groups`` groups (about the guides of a genome-wide screen):

- ``group_means``: ``mcvi_ops.tl._utils.group_means`` (a CSR indicator matrix times the data,
  divided by the counts; integer group codes in, codes < 0 ignored);
- ``scanpy, with AnnData``: ``scanpy.get.aggregate(adata, by=..., func="mean", obsm=...)``
  including building the AnnData and the categorical it needs from the same codes (what
  ``group_means`` would have to do to call it);
- ``scanpy, call only``: the same call on a ready-made AnnData;
- ``tl.aggregate``: the whole cells -> guides -> genes function (4 guides per gene).

Prints the table and writes it to benchmarks/results/aggregate.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from _report import machine_line, markdown_table


def scanpy_input(x: np.ndarray, codes: np.ndarray, n_groups: int) -> ad.AnnData:
    groups = pd.Categorical.from_codes(codes, categories=np.arange(n_groups).astype(str))
    index = pd.RangeIndex(codes.size).astype(str)
    adata = ad.AnnData(obs=pd.DataFrame({"group": groups}, index=index))
    adata.obsm["x"] = x
    return adata


def scanpy_means(adata: ad.AnnData) -> np.ndarray:
    import scanpy as sc

    return sc.get.aggregate(adata, by="group", func="mean", obsm="x").layers["mean"]


def best_of(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dims", type=int, default=64)
    parser.add_argument("--groups", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from mcvi_ops.tl import aggregate
    from mcvi_ops.tl._utils import group_means

    rows = []
    for n in args.sizes:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(n, args.dims)).astype(np.float32)
        # every group gets at least one cell, the rest at random
        codes = np.concatenate(
            [np.arange(args.groups), rng.integers(0, args.groups, n - args.groups)]
        )
        rng.shuffle(codes)
        t_gm, ours = best_of(lambda: group_means(x, codes, args.groups)[0], args.repeats)  # noqa: B023
        t_sc, theirs = best_of(
            lambda: scanpy_means(scanpy_input(x, codes, args.groups)),  # noqa: B023
            args.repeats,
        )
        prepared = scanpy_input(x, codes, args.groups)
        t_call, _ = best_of(lambda: scanpy_means(prepared), args.repeats)  # noqa: B023
        diff = np.abs(ours - theirs).max()

        guides = np.array([f"sg{i:05d}" for i in range(args.groups)])
        gene_of_guide = np.array(
            [
                "nontargeting" if i < args.groups // 40 else f"G{i // 4:05d}"
                for i in range(args.groups)
            ]
        )
        obs = pd.DataFrame(
            {"sgRNA": guides[codes], "gene_symbol": gene_of_guide[codes]},
            index=pd.RangeIndex(n).astype(str),
        )
        cells = ad.AnnData(obs=obs)
        cells.obsm["X_emb"] = x
        t_agg, genes = best_of(lambda: aggregate(cells, use_rep="X_emb"), args.repeats)  # noqa: B023
        rows.append(
            {
                "cells": f"{n:,}",
                "groups": f"{args.groups:,}",
                "group_means (s)": round(t_gm, 3),
                "scanpy, with AnnData (s)": round(t_sc, 3),
                "scanpy, call only (s)": round(t_call, 3),
                "scanpy / group_means": f"{t_sc / t_gm:.1f}x",
                "max abs difference": f"{diff:.1e}",
                "tl.aggregate, gene level (s)": round(t_agg, 3),
                "genes": genes.n_obs,
            }
        )
        print(rows[-1], flush=True)

    table = pd.DataFrame(rows)
    lines = [
        "# Group means",
        "",
        "`python benchmarks/bench_aggregate.py` (best of "
        f"{args.repeats} runs; float32 embedding, {args.dims} dims, {args.groups:,} groups of random "
        f"size; scanpy {importlib.metadata.version('scanpy')}).",
        "",
        f"- recorded: {machine_line()} (2 cores shared with other jobs: timings are noisy)",
        "",
        markdown_table(table, index=False),
        "",
        "`group_means` and scanpy do the same sparse indicator product; scanpy's cost is building "
        "its categorical groups, a COO indicator and a float64 result. `mcvi_ops.tl._utils."
        "group_means` is kept because it is several times faster here (and scanpy 1.11's "
        "`mask=` divides masked sums by unmasked counts, scverse/scanpy#4178).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(__file__).parent / "results" / "aggregate.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
