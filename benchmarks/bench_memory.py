"""Peak memory of the whole path at growing screen sizes: does it stay flat?

For each size (default 20k, 200k and 1 M cells at 64 px) a simulated screen is streamed to a zarr
store on disk once (cached under ``--store-dir``), then a fresh Python process runs what a user
runs on it, in order, while a thread samples the process's resident memory every 20 ms:

1. ``read``: the cell table (``anndata.read_h5ad``) linked to its store,
2. ``setup``: ``pp.derive_covariates``, ``pp.estimate_intensity_factors``,
   ``MCVAE.setup_anndata``, ``MCVAE(adata)``,
3. ``train``: ``model.train`` for a fixed number of steps (same for every size),
4. ``embed``: ``get_latent_representation(kind="both", add_to_obsm=True)`` over every cell,
5. ``aggregate``: ``tl.aggregate`` (cells -> guides -> genes),
6. ``metrics``: ``metrics.known_relationships`` (the screen's own complexes),
   ``metrics.technical_covariates`` and ``tl.phenotype_novelty``.

The per-cell arrays a user asks for (``.obs``, ``.X``, ``.obsm``) must grow with the screen; the
benchmark reports their size and judges the rest: peak RSS minus those arrays should stay within
+10% from the smallest to the largest screen (issue 12).

Run::

    python benchmarks/bench_memory.py                       # 20k, 200k, 1M (about 1 h on 2 cores)
    python benchmarks/bench_memory.py --sizes 20000 200000  # quicker

Writes ``benchmarks/results/memory.md`` (with ``--tag``: ``memory_<tag>.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).parent
STAGES = ["read", "setup", "train", "embed", "aggregate", "metrics"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Sampler:
    """Peak resident memory per stage, sampled by a background thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.stage = "start"
        self.peaks: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = _rss_bytes()
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), rss)
            time.sleep(self.interval)

    def enter(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[self.stage] = now - self._t0
        self._t0 = now
        rss = _rss_bytes()
        self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), rss)
        self.stage = stage
        self.peaks[stage] = rss

    def close(self) -> None:
        self.enter("end")
        self._stop.set()
        self._thread.join()


def _per_cell_bytes(adata) -> int:
    """Bytes of the per-cell arrays a user keeps: ``.obs``, ``.X`` and ``.obsm``."""
    total = int(adata.obs.memory_usage(deep=True).sum()) + int(
        adata.obs_names.memory_usage(deep=True)
    )
    if adata.X is not None:
        total += int(adata.X.nbytes)
    for value in adata.obsm.values():  # arrays, or data frames (scvi-tools' covariate fields)
        total += int(
            value.memory_usage(deep=True).sum() if hasattr(value, "memory_usage") else value.nbytes
        )
    return total


def _simulate(n_cells: int, crop_size: int, store_dir: Path) -> Path:
    """Stream the screen to disk once; return the path of its cell table."""
    import anndata as ad

    import mcvi_ops

    folder = store_dir / f"screen_n{n_cells}_px{crop_size}"
    h5ad = folder / "cells.h5ad"
    if h5ad.exists():
        return h5ad
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    adata = mcvi_ops.datasets.synthetic_screen(
        n_cells=n_cells, crop_size=crop_size, path=folder / "crops.zarr", overwrite=True
    )
    seconds = time.perf_counter() - t0
    adata.uns["simulation_seconds"] = seconds
    ad.settings.allow_write_nullable_strings = True
    adata.write_h5ad(h5ad)
    print(f"simulated {n_cells} cells in {seconds:.0f} s", flush=True)
    return h5ad


def _run_one(h5ad: Path, *, steps: int, batch_size: int, out: Path) -> None:
    """The measured pipeline, in this (fresh) process."""
    sampler = _Sampler()
    import anndata as ad
    import scvi

    import mcvi_ops

    scvi.settings.seed = 0
    baseline = _rss_bytes()
    sampler.enter("read")
    adata = ad.read_h5ad(h5ad)
    sampler.enter("setup")
    mcvi_ops.pp.derive_covariates(adata)
    mcvi_ops.pp.estimate_intensity_factors(adata, batch_key="batch")
    mcvi_ops.MCVAE.setup_anndata(
        adata,
        perturbation_key="gene_symbol",
        control_category="nontargeting",
        batch_key="batch",
        intensity_factor_key="intensity_factors",
    )
    model = mcvi_ops.MCVAE(adata)
    sampler.enter("train")
    model.train(
        max_epochs=1,
        max_steps=steps,
        batch_size=batch_size,
        save_checkpoints=False,
        enable_progress_bar=False,
        limit_val_batches=2,
    )
    sampler.enter("embed")
    model.get_latent_representation(kind="both", add_to_obsm=True)
    sampler.enter("aggregate")
    genes = mcvi_ops.tl.aggregate(adata, use_rep="X_mcvae")
    sampler.enter("metrics")
    mcvi_ops.metrics.known_relationships(
        genes, use_rep="X_mcvae", relationships=adata.uns["synthetic_screen"]["complexes"]
    )
    mcvi_ops.metrics.technical_covariates(adata, use_rep=["X_mcvae_salient"])
    mcvi_ops.tl.phenotype_novelty(adata, n_permutations=200)
    sampler.close()
    record = {
        "n_cells": adata.n_obs,
        "baseline_bytes": baseline,
        "per_cell_bytes": _per_cell_bytes(adata),
        "peaks": sampler.peaks,
        "seconds": sampler.seconds,
    }
    out.write_text(json.dumps(record))


def _table(records: list[dict]) -> str:
    import pandas as pd

    rows = []
    for r in records:
        peak = max(r["peaks"].values())
        row = {"cells": f"{r['n_cells']:,}"}
        for stage in STAGES:
            row[f"{stage} peak (GB)"] = round(r["peaks"].get(stage, 0) / 1e9, 2)
        row["peak RSS (GB)"] = round(peak / 1e9, 2)
        row["obs + X + obsm (GB)"] = round(r["per_cell_bytes"] / 1e9, 3)
        row["peak - per-cell arrays (GB)"] = round((peak - r["per_cell_bytes"]) / 1e9, 2)
        row["seconds"] = round(sum(r["seconds"].get(s, 0) for s in STAGES))
        rows.append(row)
    frame = pd.DataFrame(rows)
    base = frame["peak - per-cell arrays (GB)"].iloc[0]
    frame["vs smallest"] = [f"{v / base - 1:+.1%}" for v in frame["peak - per-cell arrays (GB)"]]
    sys.path.insert(0, str(HERE))
    from _report import markdown_table

    return markdown_table(frame, index=False)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000, 1_000_000])
    parser.add_argument("--crop-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="training steps at every size")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--store-dir",
        type=Path,
        default=Path.home() / ".cache" / "mcvi-ops-bench" / "memory",
        help="where the simulated screens are kept between runs (1 M cells at 64 px: ~16 GB)",
    )
    parser.add_argument("--tag", default=None)
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="report the sizes already measured (records in --store-dir) without running them",
    )
    parser.add_argument("--run-one", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run_one is not None:
        _run_one(args.run_one, steps=args.steps, batch_size=args.batch_size, out=args.record)
        return

    records = []
    for n in args.sizes:
        h5ad = _simulate(n, args.crop_size, args.store_dir)
        record_path = h5ad.parent / f"memory_record_{args.steps}steps.json"
        if args.reuse and record_path.exists():
            records.append(json.loads(record_path.read_text()))
            continue
        cmd = [
            sys.executable,
            __file__,
            "--run-one",
            str(h5ad),
            "--record",
            str(record_path),
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
        ]
        subprocess.run(cmd, check=True)
        records.append(json.loads(record_path.read_text()))
        print(json.dumps(records[-1]), flush=True)

    sys.path.insert(0, str(HERE))
    from _report import machine_line

    table = _table(records)
    name = "memory.md" if args.tag is None else f"memory_{args.tag}.md"
    text = (
        "# Peak memory from 20k to 1 M cells\n\n"
        f"Recorded {machine_line()}.\n\n"
        f"`python benchmarks/bench_memory.py --sizes {' '.join(map(str, args.sizes))} "
        f"--steps {args.steps} --batch-size {args.batch_size}` ({args.crop_size} px crops streamed "
        "from a zarr store on local disk; each size in a fresh process; resident memory sampled "
        "every 20 ms; each stage's column is the peak during that stage).\n\n"
        f"{table}\n"
    )
    (HERE / "results" / name).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
