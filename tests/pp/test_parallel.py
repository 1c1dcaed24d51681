"""Parallel extraction: workers crop and write the chunks; the store equals a single process's."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from mcvi_ops.data import CropWriter, get_crops, open_crops
from mcvi_ops.pp import _parallel, extract_crops


def _spy(function, log):
    """Wrap a worker function so that each call records its process id (picklable by name)."""

    def wrapped(*args):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return function(*args)

    wrapped.__module__, wrapped.__qualname__ = function.__module__, function.__qualname__
    return wrapped


def test_workers_write_every_chunk(tiles, tmp_path, channels, monkeypatch, same_store):
    template, table, _ = tiles
    kwargs = {"channel_names": channels, "chunk_cells": 40, "align": False, "progress": False}
    single = extract_crops(template, table, tmp_path / "one", **kwargs)
    log = tmp_path / "pids.txt"
    monkeypatch.setattr(_parallel, "write_pieces", _spy(_parallel.write_pieces, log))
    written_here = []
    write = CropWriter._write
    monkeypatch.setattr(
        CropWriter, "_write", lambda self, start, data: written_here.append(len(data))
    )
    two = extract_crops(template, table, tmp_path / "two", n_jobs=2, **kwargs)
    pids = {int(line) for line in log.read_text().split()}
    store = open_crops(tmp_path / "two" / "crops.zarr")
    assert len(log.read_text().split()) == store.n_chunks  # each chunk written once
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert not any(written_here)  # the main process wrote no chunk
    assert write is not CropWriter._write
    pd.testing.assert_frame_equal(single.obs, two.obs)
    same_store(tmp_path / "one" / "crops.zarr", tmp_path / "two" / "crops.zarr")
    assert not (tmp_path / "two" / ".extract_spill").exists()


def test_parallel_skips_missing_and_empty_tiles(small_screen, tmp_path, same_store):
    images, table = small_screen(n_tiles=7, cells_per_tile=6)
    images = dict(images)
    del images[3]
    table.loc[table.tile == 5, "cell_i"] = 0.0  # every cell of tile 5 is at the edge
    kwargs = {
        "channel_names": ["a", "b"],
        "tile_key": "tile",
        "crop_size": 12,
        "chunk_cells": 4,
        "on_missing_tile": "skip",
        "progress": False,
    }
    one = extract_crops(images, table, tmp_path / "one", **kwargs)
    two = extract_crops(images, table, tmp_path / "two", n_jobs=2, **kwargs)
    info = two.uns["extract_crops"]
    assert info["n_dropped_missing_tile"] == 6 and info["n_dropped_edge"] >= 6
    pd.testing.assert_frame_equal(one.obs, two.obs)
    same_store(tmp_path / "one" / "crops.zarr", tmp_path / "two" / "crops.zarr")


def test_client_and_n_jobs_together_are_an_error(small_screen, tmp_path):
    images, table = small_screen(n_tiles=1)
    with pytest.raises(ValueError, match="either n_jobs .* or client"):
        extract_crops(
            images[0], table, tmp_path, channel_names=["a", "b"], n_jobs=2, client=object()
        )


@pytest.mark.slow  # starts a 2-worker cluster (about 20 s on 2 cores)
def test_dask_cluster_writes_the_same_store(tiles, tmp_path, channels, same_store):
    distributed = pytest.importorskip("distributed")
    template, table, _ = tiles
    kwargs = {"channel_names": channels, "chunk_cells": 64, "align": False, "progress": False}
    single = extract_crops(template, table, tmp_path / "one", **kwargs)
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        on_dask = extract_crops(template, table, tmp_path / "dask", client=client, **kwargs)
    pd.testing.assert_frame_equal(single.obs, on_dask.obs)
    assert single.uns["extract_crops"] == on_dask.uns["extract_crops"]
    same_store(tmp_path / "one" / "crops.zarr", tmp_path / "dask" / "crops.zarr")
    np.testing.assert_array_equal(get_crops(on_dask, [0, 7]), get_crops(single, [0, 7]))
