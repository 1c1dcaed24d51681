"""Shared fixtures: seeding, small linked crop stores, and the real images in tests/data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    import scvi

    scvi.settings.seed = 0
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def make_linked(tmp_path):
    """Make a small AnnData linked to random crops on disk."""
    import anndata as ad
    import pandas as pd

    from mcvi_ops.data import link_crops, write_crops

    def make(n=40, channels=("DAPI", "tubulin"), size=16, name="crops.zarr", seed=0):
        rng = np.random.default_rng(seed)
        crops = rng.integers(0, 4000, (n, len(channels), size, size), dtype=np.uint16)
        store = write_crops(tmp_path / name, crops, channel_names=list(channels), chunk_cells=16)
        obs = pd.DataFrame(
            {"gene_symbol": np.where(np.arange(n) % 3 == 0, "nontargeting", "GENE1")},
            index=[f"cell{i}" for i in range(n)],
        )
        adata = ad.AnnData(obs=obs)
        link_crops(adata, store)
        return adata, crops

    return make


# --- real images and multi-tile layouts built from them (io and pp tests) ---
DATA = Path(__file__).parent / "data"
EXAMPLEHUMAN = DATA / "images" / "examplehuman"
IMAGE_PATH = EXAMPLEHUMAN / "ExampleHuman_D03f00_CYX_DNA-PH3-cellbody.tif"
CELLS_PATH = EXAMPLEHUMAN / "ExampleHuman_cells_metadata.csv"
STARDIST = DATA / "images" / "stardist_nuclei"
FUNK_INFO = DATA / "funk2022" / "example_tile_phenotype_info.csv"
CHANNELS = ["DNA", "PH3", "cellbody"]


def examplehuman() -> tuple[np.ndarray, pd.DataFrame]:
    return tifffile.imread(IMAGE_PATH), pd.read_csv(CELLS_PATH)


def multi_tile(folder: Path, n_tiles: int = 3) -> tuple[str, pd.DataFrame, dict]:
    """Write ``n_tiles`` real tiles (flips/transposes of the ExampleHuman field) as TIFFs.

    Returns a path template, a Funk-style cell table (well, tile, cell_i, cell_j) listing the
    same cells in every tile at their transformed positions, and a dict tile -> image.
    """
    image, cells = examplehuman()
    y = cells["Nuclei_Location_Center_Y"].to_numpy()
    x = cells["Nuclei_Location_Center_X"].to_numpy()
    size = image.shape[1]
    transforms = [
        (lambda im: im, lambda y, x: (y, x)),
        (lambda im: im[:, :, ::-1], lambda y, x: (y, size - 1 - x)),
        (lambda im: im[:, ::-1, :], lambda y, x: (size - 1 - y, x)),
        (lambda im: im.transpose(0, 2, 1), lambda y, x: (x, y)),
    ]
    folder.mkdir(parents=True, exist_ok=True)
    tables, images = [], {}
    for tile in range(n_tiles):
        f_image, f_coords = transforms[tile % len(transforms)]
        tile_image = np.ascontiguousarray(f_image(image))
        images[tile] = tile_image
        tifffile.imwrite(folder / f"A1_Tile-{tile}.tif", tile_image, photometric="minisblack")
        ty, tx = f_coords(y, x)
        tables.append(
            pd.DataFrame(
                {
                    "well": "A1",
                    "tile": tile,
                    "cell": np.arange(len(cells)) + 1,
                    "cell_i": ty,
                    "cell_j": tx,
                    "gene_symbol_0": np.where(np.arange(len(cells)) % 3, "POLR2A", "nontargeting"),
                }
            )
        )
    # shuffle tile order in the table: the output must still come out sorted by tile
    table = pd.concat(tables[::-1], ignore_index=True)
    return str(folder / "{well}_Tile-{tile}.tif"), table, images


def store_files(root: Path) -> dict[str, bytes]:
    """Every file of a zarr store, by relative path, for byte-for-byte comparison."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="session")
def eh() -> tuple[np.ndarray, pd.DataFrame]:
    """The ExampleHuman field (C, Y, X) and its CellProfiler cell table."""
    return examplehuman()


@pytest.fixture(scope="session")
def eh_crops(eh) -> tuple[np.ndarray, pd.DataFrame]:
    """Real 40 px crops (cells, 3, 40, 40) around the ExampleHuman nuclei, and their table rows.

    Only nuclei whose rounded centroid lies at least 20 px inside the field are kept (262 of
    289), in table order; the crops are read-only since the fixture is shared.
    """
    image, cells = eh
    rows = np.floor(cells["Nuclei_Location_Center_Y"].to_numpy() + 0.5).astype(int)
    cols = np.floor(cells["Nuclei_Location_Center_X"].to_numpy() + 0.5).astype(int)
    half, (height, width) = 20, image.shape[1:]
    ok = (rows >= half) & (cols >= half) & (rows <= height - half) & (cols <= width - half)
    crops = np.stack(
        [
            image[:, r - half : r + half, c - half : c + half]
            for r, c in zip(rows[ok], cols[ok], strict=True)
        ]
    )
    crops.flags.writeable = False
    return crops, cells[ok].reset_index(drop=True)


@pytest.fixture
def tiles(tmp_path) -> tuple[str, pd.DataFrame, dict]:
    """Three real tiles as TIFFs, a path template and a Funk-style cell table."""
    return multi_tile(tmp_path / "tiles")


@pytest.fixture(scope="session")
def paths() -> dict[str, Path]:
    return {
        "image": IMAGE_PATH,
        "cells": CELLS_PATH,
        "stardist": STARDIST,
        "funk_info": FUNK_INFO,
    }


@pytest.fixture(scope="session")
def channels() -> list[str]:
    return list(CHANNELS)


@pytest.fixture(scope="session")
def files_of():
    return store_files
