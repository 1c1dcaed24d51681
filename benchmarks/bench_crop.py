"""Benchmark `mcvi_ops.pp.extract_crops`: crops per second from Funk-sized tiles.

Tiles of 2,960 x 2,960 px with 4 channels (the size of the Funk et al. 2022 phenotype tiles) are
built from the real ExampleHuman field (DNA, PH3, cell body, plus the DNA channel transposed as a
fourth channel) by mirroring it, and the real nuclei centroids are mirrored with it; a random
subset of ``--cells-per-tile`` cells per tile is cropped. The default preprocessing runs (channel
alignment, 0.1% clipping, 100 px crops, 50 px edge margin), writing a compressed crop store.

    python benchmarks/bench_crop.py [--data ../shared/data] [--n-tiles 4] [--n-jobs 1 2]

Prints the numbers and writes them to benchmarks/results/crop.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from _report import machine_line

REPO = Path(__file__).resolve().parents[1]
IMAGE = "images/examplehuman/ExampleHuman_D03f00_CYX_DNA-PH3-cellbody.tif"
CELLS = "images/examplehuman/ExampleHuman_cells_metadata.csv"


def mirrored_tile(image: np.ndarray, size: int, flip: int) -> np.ndarray:
    """Mirror a (C, n, n) image into a (C, size, size) tile; ``flip`` varies the tiles."""
    n = image.shape[1]
    reps = -(-size // n)
    row = np.concatenate([image, image[:, :, ::-1]] * reps, axis=2)[:, :, :size]
    tile = np.concatenate([row, row[:, ::-1]] * reps, axis=1)[:, :size]
    return np.ascontiguousarray(np.rot90(tile, k=flip, axes=(1, 2)))


def mirrored_cells(y: np.ndarray, x: np.ndarray, n: int, size: int, flip: int) -> np.ndarray:
    """The centroids of every mirrored copy of the cells inside the tile, as (row, column)."""
    blocks = -(-size // n)
    ys, xs = [], []
    for bi in range(blocks):
        for bj in range(blocks):
            ys.append(bi * n + (y if bi % 2 == 0 else n - 1 - y))
            xs.append(bj * n + (x if bj % 2 == 0 else n - 1 - x))
    yy, xx = np.concatenate(ys), np.concatenate(xs)
    inside = (yy < size) & (xx < size)
    yy, xx = yy[inside], xx[inside]
    for _ in range(flip % 4):  # follow np.rot90(k=1, axes=(1, 2)): (r, c) -> (size-1-c, r)
        yy, xx = size - 1 - xx, yy
    return np.stack([yy, xx], axis=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--n-tiles", type=int, default=4)
    parser.add_argument("--tile-size", type=int, default=2960)
    parser.add_argument("--cells-per-tile", type=int, default=1500)
    parser.add_argument("--n-jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (a temp dir)")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "crop.md")
    args = parser.parse_args(argv)

    if not (args.data / IMAGE).exists():
        print(
            f"Data not found: {args.data / IMAGE}. Pass --data pointing at the shared data "
            "folder (holding images/examplehuman/).",
            file=sys.stderr,
        )
        return 2
    from mcvi_ops.pp import extract_crops

    image = tifffile.imread(args.data / IMAGE)
    image = np.concatenate([image, image[:1].transpose(0, 2, 1)])  # 4 channels
    cells = pd.read_csv(args.data / CELLS)
    y = cells["Nuclei_Location_Center_Y"].to_numpy()
    x = cells["Nuclei_Location_Center_X"].to_numpy()
    rng = np.random.default_rng(0)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_crop_"))
    (work / "tiles").mkdir(parents=True, exist_ok=True)
    tables = []
    for tile in range(args.n_tiles):
        tifffile.imwrite(
            work / "tiles" / f"A1_{tile}.tif",
            mirrored_tile(image, args.tile_size, tile),
            photometric="minisblack",
        )
        centres = mirrored_cells(y, x, image.shape[1], args.tile_size, tile)
        pick = np.sort(
            rng.choice(len(centres), size=min(args.cells_per_tile, len(centres)), replace=False)
        )
        tables.append(
            pd.DataFrame(
                {"well": "A1", "tile": tile, "cell_i": centres[pick, 0], "cell_j": centres[pick, 1]}
            )
        )
    table = pd.concat(tables, ignore_index=True)
    channels = ["DAPI", "PH3", "cellbody", "DAPI_T"]

    rows = []
    for n_jobs in args.n_jobs:
        out = work / f"out_{n_jobs}"
        start = time.perf_counter()
        adata = extract_crops(
            str(work / "tiles" / "{well}_{tile}.tif"),
            table,
            out,
            channel_names=channels,
            n_jobs=n_jobs,
            overwrite=True,
            progress=False,
        )
        seconds = time.perf_counter() - start
        n = adata.n_obs
        rows.append((n_jobs, n, seconds, n / seconds, args.n_tiles / seconds))
        print(
            f"n_jobs={n_jobs}: {n} crops from {args.n_tiles} tiles in {seconds:.1f} s = "
            f"{n / seconds:.0f} crops/s ({args.n_tiles / seconds:.2f} tiles/s)"
        )
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        "# Crop extraction (`mcvi_ops.pp.extract_crops`)",
        "",
        f"- recorded: {machine_line()}",
        f"- input: {args.n_tiles} tiles of {args.tile_size} x {args.tile_size} px x 4 channels "
        f"(uint16 TIFF, mirrored from the real ExampleHuman field), {len(table)} cells "
        f"({args.cells_per_tile} per tile)",
        "- settings: defaults (phase cross-correlation alignment, 0.1/99.9% clipping, 100 px "
        "crops, 50 px edge margin, uint16 zstd-compressed zarr store, AnnData written)",
        "",
        "| n_jobs | crops | seconds | crops/s | tiles/s |",
        "|---:|---:|---:|---:|---:|",
        *[f"| {j} | {n} | {s:.1f} | {c:.0f} | {t:.2f} |" for j, n, s, c, t in rows],
        "",
    ]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines))
    print(f"Wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
