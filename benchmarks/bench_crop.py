"""Benchmark `mcvi_ops.pp.extract_crops`: crops per second from Funk-sized tiles.

Tiles of 2,960 x 2,960 px with 4 channels (the size of the Funk et al. 2022 phenotype tiles) are
built from the real ExampleHuman field (DNA, PH3, cell body, plus the DNA channel transposed as a
fourth channel) by mirroring it, and the real nuclei centroids are mirrored with it; a random
subset of ``--cells-per-tile`` cells per tile is cropped. The default preprocessing runs (channel
alignment, 0.1% clipping, 100 px crops, 50 px edge margin), writing a compressed crop store.
Each configuration runs ``--repeats`` times (the best time counts). Local process pools (``--n-jobs``)
and, if ``distributed`` is installed, a local Dask cluster of ``--dask-workers`` processes are
timed; every store is checked to be byte-for-byte the single-process one (apart from its id).

    python benchmarks/bench_crop.py [--data ../shared/data] [--n-tiles 4] [--n-jobs 1 2]
        [--dask-workers 2] [--repeats 2]

Prints the numbers and writes them to benchmarks/results/crop.md.
"""

from __future__ import annotations

import argparse
import json
import os
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


def store_bytes(root: Path) -> dict[str, bytes]:
    """Every file of a crop store, with the group's random store_id blanked."""
    files = {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }
    meta = json.loads(files["zarr.json"])
    meta["attributes"].pop("store_id", None)
    files["zarr.json"] = json.dumps(meta).encode()
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--n-tiles", type=int, default=4)
    parser.add_argument("--tile-size", type=int, default=2960)
    parser.add_argument("--cells-per-tile", type=int, default=1500)
    parser.add_argument("--n-jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dask-workers", type=int, default=2, help="0: no Dask run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting; best counts")
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

    settings: list[tuple[str, dict]] = [(f"n_jobs={j}", {"n_jobs": j}) for j in args.n_jobs]
    cluster = client = None
    if args.dask_workers:
        try:
            import distributed
        except ImportError:
            print("distributed is not installed: no Dask run.", file=sys.stderr)
        else:
            cluster = distributed.LocalCluster(
                n_workers=args.dask_workers,
                processes=True,
                threads_per_worker=1,
                dashboard_address=None,
            )
            client = distributed.Client(cluster)
            settings.append((f"dask, {args.dask_workers} workers", {"client": client}))

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    rows, reference = [], None
    try:
        for name, options in settings:
            out = work / f"out_{len(rows)}"
            times, cpu = [], []
            for _ in range(args.repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                adata = extract_crops(
                    str(work / "tiles" / "{well}_{tile}.tif"),
                    table,
                    out,
                    channel_names=channels,
                    overwrite=True,
                    progress=False,
                    **options,
                )
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            best = int(np.argmin(times))
            seconds, main_cpu, n = times[best], cpu[best], adata.n_obs
            files = store_bytes(out / "crops.zarr")
            reference = files if reference is None else reference
            same = "yes" if files == reference else "NO"
            rows.append((name, n, seconds, n / seconds, main_cpu, same))
            print(
                f"{name}: {n} crops from {args.n_tiles} tiles in {seconds:.1f} s = "
                f"{n / seconds:.0f} crops/s, main-process CPU {main_cpu:.1f} s, "
                f"store identical to the first: {same}"
            )
    finally:
        if client is not None:
            client.close()
            cluster.close()
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
        "crops, 50 px edge margin, uint16 zstd-compressed zarr store, AnnData written); best of "
        f"{args.repeats} runs; the Dask cluster is started before timing",
        "- parallel runs: workers crop tiles and compress and write the store's chunks "
        "themselves; the main process only lays out rows and commits tiles",
        f"- load average before the runs (1, 5, 15 min): {load}; other jobs shared the CPUs",
        "",
        "| run | crops | seconds | crops/s | main-process CPU s | store identical to n_jobs=1 |",
        "|---|---:|---:|---:|---:|---|",
        *[f"| {j} | {n} | {s:.1f} | {c:.0f} | {m:.1f} | {d} |" for j, n, s, c, m, d in rows],
        "",
    ]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines))
    print(f"Wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
