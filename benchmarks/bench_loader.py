"""Throughput of the crop data loaders on a synthetic on-disk crop store.

Run with ``python benchmarks/bench_loader.py [--n-cells 20000]``; prints a table and writes it to
``benchmarks/results/loader.md``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from _report import machine_line
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField

from mcvi_ops.data import ImageField, link_crops, write_crops
from mcvi_ops.dataloaders._loader import CropDataLoader

logger = logging.getLogger("bench_loader")
RESULTS = Path(__file__).parent / "results" / "loader.md"


def smooth_crops(n: int, *, channels: int = 4, size: int = 64, seed: int = 0) -> np.ndarray:
    """Compressible crops: an upsampled 8x8 random field per channel plus Poisson-like noise."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, channels, size, size), dtype=np.uint16)
    factor = size // 8
    for start in range(0, n, 1000):
        m = min(1000, n - start)
        low = rng.gamma(2.0, 400.0, (m, channels, 8, 8)).astype(np.float32)
        smooth = low.repeat(factor, axis=2).repeat(factor, axis=3)
        noise = rng.normal(0.0, 20.0, smooth.shape).astype(np.float32)
        out[start : start + m] = np.clip(smooth + noise + 100, 0, 65535).astype(np.uint16)
    return out


def make_screen(path: Path, n_cells: int, *, control_fraction: float = 0.1):
    """A crop store on disk and a registered AnnData manager (perturbation code 0 = control)."""
    try:  # the package simulator, if it is there
        from mcvi_ops.datasets import synthetic_screen

        adata = synthetic_screen(n_cells, seed=0, path=str(path), crop_size=64)
        genes = adata.obs["gene_symbol"].astype(str)
        adata.obs["perturbation"] = pd.Categorical(
            genes, categories=["nontargeting", *sorted(set(genes) - {"nontargeting"})]
        )
        source = "mcvi_ops.datasets.synthetic_screen"
    except (ImportError, NotImplementedError, TypeError):
        crops = smooth_crops(n_cells)
        write_crops(path, crops, channel_names=["DAPI", "tubulin", "gH2AX", "phalloidin"])
        rng = np.random.default_rng(0)
        genes = np.where(
            rng.random(n_cells) < control_fraction,
            "nontargeting",
            np.char.add("g", rng.integers(0, 200, n_cells).astype(str)),
        )
        genes = pd.Categorical(
            genes, categories=["nontargeting", *sorted(set(genes) - {"nontargeting"})]
        )
        adata = ad.AnnData(
            obs=pd.DataFrame({"perturbation": genes}, index=[f"c{i}" for i in range(n_cells)])
        )
        link_crops(adata, path)
        source = "smooth random field + noise"
    # the control category comes first, so its code is 0
    manager = AnnDataManager(
        fields=[ImageField("crops"), CategoricalObsField("perturbation", "perturbation")]
    )
    manager.register_fields(adata)
    return manager, source


def time_loader(loader, *, max_batches: int | None = None) -> tuple[float, int]:
    """Cells per second of one pass (the first batch, which starts workers, is not timed)."""
    it = iter(loader)
    next(it)
    n_cells, start = 0, time.perf_counter()
    for i, batch in enumerate(it):
        n_cells += len(batch["X"])
        if max_batches is not None and i + 1 >= max_batches:
            break
    return n_cells / (time.perf_counter() - start), n_cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-cells", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "crops.zarr"
        start = time.perf_counter()
        manager, source = make_screen(path, args.n_cells)
        write_s = time.perf_counter() - start
        store = CropDataLoader(manager, batch_size=2).dataset.store
        size_mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
        raw_mb = store.n_cells * np.prod(store.shape[1:]) * store.dtype.itemsize / 1e6
        logger.info(
            "store: %s, %.0f MB on disk (%.0f MB raw), made in %.1f s",
            store,
            size_mb,
            raw_mb,
            write_s,
        )

        start = time.perf_counter()
        for chunk in range(store.n_chunks):
            store.read_chunk(chunk)
        rows.append(
            (
                "store.read_chunk, sequential (no loader)",
                0,
                store.n_cells / (time.perf_counter() - start),
            )
        )

        bs = args.batch_size
        codes = manager.get_from_registry("perturbation").reshape(-1)
        n_control = int((codes == 0).sum())
        configs = [
            ("sequential loader (balanced=False, shuffle=False)", {"balanced": False}, 0),
            ("balanced training loader, window_chunks=8", {"balanced": True, "shuffle": True}, 0),
            ("balanced training loader, window_chunks=8", {"balanced": True, "shuffle": True}, 1),
            ("balanced training loader, window_chunks=8", {"balanced": True, "shuffle": True}, 2),
            (
                "balanced, window_chunks=8, no chunk cache (take per batch)",
                {"balanced": True, "shuffle": True, "cache_chunks": 0},
                0,
            ),
            (
                "balanced, fully random (window = all chunks)",
                {
                    "balanced": True,
                    "shuffle": True,
                    "window_chunks": store.n_chunks,
                    "cache_chunks": 32,
                },
                0,
            ),
        ]
        for name, kwargs, workers in configs:
            loader = CropDataLoader(manager, batch_size=bs, num_workers=workers, seed=0, **kwargs)
            rate, n = time_loader(
                loader, max_batches=40 if "cache" in name or "random" in name else None
            )
            logger.info("%-55s workers=%d  %8.0f cells/s (%d cells)", name, workers, rate, n)
            rows.append((name, workers, rate))

    lines = [
        "# Crop loader throughput",
        "",
        f"- recorded: {machine_line()}",
        f"- data: {store.n_cells} crops {store.shape[1]}x{store.shape[2]}x{store.shape[3]} "
        f"{store.dtype} ({source}), {store.chunk_cells} cells/chunk, blosc-zstd, "
        f"{size_mb:.0f} MB on disk ({raw_mb:.0f} MB raw), local disk (page cache warm)",
        f"- batch size {bs}; balanced loaders: {n_control / store.n_cells:.0%} controls (cycled); "
        f"chunk cache 4 * window_chunks = 32 chunks unless stated",
        "",
        "| reader | workers | cells/s |",
        "|---|---:|---:|",
        *(f"| {name} | {workers} | {rate:,.0f} |" for name, workers, rate in rows),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
