"""Throughput of the crop data loaders on a simulated on-disk crop store, settings side by side.

    python benchmarks/bench_loader.py [--n-cells 20000] [--batch-size 128] [--repeats 3]
        [--baseline-ref HEAD] [--out benchmarks/results/loader.md]

Every setting is measured ``--repeats`` times, interleaved (setting 1, 2, ..., then again), so
that a machine shared with other jobs slows them alike; the table gives medians and ratios to the
balanced loader with 0 workers. Two rates per setting:

- wall: cells per second of one pass, the first batch (which starts the workers) not timed;
- CPU: cells per CPU-second of this process and its workers (startup included), which another
  job's load hardly changes.

``--baseline-ref REF`` also measures the loader of a git revision (its ``dataloaders/_loader.py``
and ``_sampler.py``) in the same run. The table goes to ``--out`` (default
``benchmarks/results/loader_run.md``; ``loader.md`` holds the recorded results and their notes).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from _report import machine_line, markdown_table
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField

from mcvi_ops.data import ImageField, open_crops
from mcvi_ops.dataloaders import CropDataLoader

logger = logging.getLogger("bench_loader")
RESULTS = Path(__file__).parent / "results" / "loader_run.md"
REPO = Path(__file__).resolve().parents[1]
ZARRS = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}


def make_screen(path: Path, n_cells: int, control_fraction: float) -> AnnDataManager:
    """A simulated screen on disk, registered with the control category as code 0."""
    from mcvi_ops.datasets import synthetic_screen

    adata = synthetic_screen(
        n_cells, seed=0, path=str(path), crop_size=64, control_fraction=control_fraction
    )
    genes = adata.obs["gene_symbol"].astype(str)
    adata.obs["perturbation"] = pd.Categorical(
        genes, categories=["nontargeting", *sorted(set(genes) - {"nontargeting"})]
    )
    manager = AnnDataManager(
        fields=[ImageField("crops"), CategoricalObsField("perturbation", "perturbation")]
    )
    manager.register_fields(adata)
    return manager


def baseline_loader_cls(ref: str, folder: Path):
    """``CropDataLoader`` of git revision ``ref``, imported as a separate package."""
    package = folder / "baseline_dataloaders"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("_loader.py", "_sampler.py"):
        source = subprocess.run(
            ["git", "show", f"{ref}:src/mcvi_ops/dataloaders/{name}"],
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (package / name).write_text(source)
    sys.path.insert(0, str(folder))
    return importlib.import_module("baseline_dataloaders._loader").CropDataLoader


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_loader(make_loader, max_batches: int | None) -> tuple[float, float]:
    """(wall cells/s without the first batch, cells per CPU-second of all processes)."""
    cpu_start = _cpu_seconds()
    loader = make_loader()
    it = iter(loader)
    n_first = len(next(it)["X"])
    n_cells, start = 0, time.perf_counter()
    for i, batch in enumerate(it):
        n_cells += len(batch["X"])
        if max_batches is not None and i + 2 >= max_batches:
            break
    wall = n_cells / (time.perf_counter() - start)
    del batch
    # stop the workers, so that their CPU time is counted
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    del it, loader
    return wall, (n_cells + n_first) / (_cpu_seconds() - cpu_start)


def time_read_chunk(url: str) -> tuple[float, float]:
    store = open_crops(url)
    cpu_start, start = _cpu_seconds(), time.perf_counter()
    for chunk in range(store.n_chunks):
        store.read_chunk(chunk)
    return (
        store.n_cells / (time.perf_counter() - start),
        store.n_cells / (_cpu_seconds() - cpu_start),
    )


def settings(args, manager, baseline_cls) -> list[tuple[str, int, dict, callable]]:
    """(name, workers, zarr config, thunk returning (wall, cpu)) of every setting."""
    bs = args.batch_size
    url = CropDataLoader(manager, batch_size=2).dataset.url

    def loader(cls=CropDataLoader, max_batches=None, **kwargs):
        def run():
            return time_loader(
                lambda: cls(manager, batch_size=bs, seed=0, **kwargs), max_batches=max_batches
            )

        return run

    balanced = {"balanced": True, "shuffle": True}
    out = [("store.read_chunk, sequential (no loader)", 0, {}, lambda: time_read_chunk(url))]
    out.append(
        ("store.read_chunk, sequential, zarrs pipeline", 0, ZARRS, lambda: time_read_chunk(url))
    )
    if baseline_cls is not None:
        for workers in (0, 2):
            out.append(
                (
                    f"before ({args.baseline_ref}): balanced, window_chunks=8",
                    workers,
                    {},
                    loader(baseline_cls, num_workers=workers, **balanced),
                )
            )
    for workers in (0, 1, 2):
        out.append(
            (
                "balanced training loader, window_chunks=8",
                workers,
                {},
                loader(num_workers=workers, **balanced),
            )
        )
    for workers in (0, 2):
        out.append(
            (
                "balanced, window_chunks=8, zarrs pipeline",
                workers,
                ZARRS,
                loader(num_workers=workers, **balanced),
            )
        )
    out.append(("sequential loader (balanced=False, shuffle=False)", 0, {}, loader(balanced=False)))
    out.append(
        (
            "balanced, no chunk cache (take per batch), 40 batches",
            0,
            {},
            loader(max_batches=40, cache_chunks=0, **balanced),
        )
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--control-fraction", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-ref", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "crops.zarr"
        manager = make_screen(path, args.n_cells, args.control_fraction)
        store = open_crops(str(path))
        size_mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
        baseline = baseline_loader_cls(args.baseline_ref, Path(tmp)) if args.baseline_ref else None
        runs = settings(args, manager, baseline)
        records, loads = [], [os.getloadavg()[0]]
        for repeat in range(args.repeats):
            for name, workers, config, run in runs:
                context = zarr.config.set(config) if config else contextlib.nullcontext()
                with context:
                    wall, cpu = run()
                records.append((name, workers, repeat, wall, cpu))
                loads.append(os.getloadavg()[0])
                logger.info(
                    "%-55s w=%d  %8.0f cells/s  %8.0f cells/CPU-s", name, workers, wall, cpu
                )

    frame = pd.DataFrame(records, columns=["reader", "workers", "repeat", "wall", "cpu"])
    table = frame.groupby(["reader", "workers"], sort=False)[["wall", "cpu"]].median()
    reference = table.loc[("balanced training loader, window_chunks=8", 0), "wall"]
    table["wall / balanced 0 workers"] = (table["wall"] / reference).map("{:.2f}".format)
    table["wall"] = table["wall"].map("{:,.0f}".format)
    table["cpu"] = table["cpu"].map("{:,.0f}".format)
    table = table.rename(columns={"wall": "cells/s (wall)", "cpu": "cells per CPU-s"})
    raw_mb = store.n_cells * np.prod(store.shape[1:]) * store.dtype.itemsize / 1e6
    codes = manager.get_from_registry("perturbation").reshape(-1)
    lines = [
        "# Crop loader throughput (one run)",
        "",
        f"- recorded: {machine_line()}",
        f"- load average (1 min) during the run: {min(loads):.1f} to {max(loads):.1f}",
        f"- data: {store.n_cells} crops {store.shape[1]}x{store.shape[2]}x{store.shape[3]} "
        f"{store.dtype} (mcvi_ops.datasets.synthetic_screen), {store.chunk_cells} cells/chunk, "
        f"blosc-zstd, {size_mb:.0f} MB on disk ({raw_mb:.0f} MB raw), page cache warm",
        f"- batch size {args.batch_size}; {(codes == 0).mean():.0%} controls; chunk cache "
        f"4 * window_chunks = 32 chunks per process; medians of {args.repeats} interleaved repeats",
        f"- command: `python benchmarks/bench_loader.py --n-cells {args.n_cells} --batch-size "
        f"{args.batch_size} --repeats {args.repeats} --control-fraction {args.control_fraction}"
        + (f" --baseline-ref {args.baseline_ref}" if args.baseline_ref else "")
        + "`",
        "",
        markdown_table(table),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
