"""Helpers for the preprocessing tests: compare stores byte for byte, apart from their id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def store_bytes(root: Path) -> dict[str, bytes]:
    """Every file of a crop store by relative path; the group's random store_id is blanked.

    Two runs of the same extraction write identical chunks and metadata, but every new store
    gets its own random ``store_id``.
    """
    files = {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }
    meta = json.loads(files["zarr.json"])
    assert meta["attributes"].pop("store_id")
    files["zarr.json"] = json.dumps(meta, sort_keys=False).encode()
    return files


@pytest.fixture(scope="session")
def same_store():
    def check(a: Path, b: Path) -> None:
        left, right = store_bytes(a), store_bytes(b)
        assert sorted(left) == sorted(right)
        differing = [name for name in left if left[name] != right[name]]
        assert not differing, f"files differ: {differing}"

    return check


def _small_screen(n_tiles: int = 5, cells_per_tile: int = 7, size: int = 48, seed: int = 0):
    """Small random 2-channel uint16 tiles and a Funk-style cell table (fast to crop)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    images = {t: rng.integers(0, 4000, (2, size, size), dtype=np.uint16) for t in range(n_tiles)}
    table = pd.DataFrame(
        {
            "well": "A1",
            "tile": np.repeat(np.arange(n_tiles), cells_per_tile),
            "cell_i": rng.uniform(2, size - 2, n_tiles * cells_per_tile),
            "cell_j": rng.uniform(2, size - 2, n_tiles * cells_per_tile),
        }
    )
    return images, table.sample(frac=1, random_state=seed)  # table order is not tile order


class _Loader:
    """Picklable tile loader that can fail on one tile, like a crash mid-run."""

    def __init__(self, images, fail_on=None, exit_on=None):
        self.images, self.fail_on, self.exit_on = images, fail_on, exit_on

    def __call__(self, key):
        if key[1] == self.exit_on:
            import os

            os._exit(3)  # a killed process: no cleanup at all
        if key[1] == self.fail_on:
            raise RuntimeError(f"simulated crash on tile {key}")
        return self.images[key[1]]


@pytest.fixture(scope="session")
def small_screen():
    """Make small random tiles (dict tile -> array) and their cell table."""
    return _small_screen


@pytest.fixture(scope="session")
def loader():
    """The picklable failing tile loader class: ``loader(images, fail_on=2)``."""
    return _Loader
