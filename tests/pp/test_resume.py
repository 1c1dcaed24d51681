"""Resuming extract_crops: crashes, killed processes, changed tiles, locked folders."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import socket
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcvi_ops.data import (
    StoreChangedError,
    StoreLockedError,
    get_crops,
    linked_store,
    open_crops,
)
from mcvi_ops.pp import extract_crops
from mcvi_ops.pp._resume import RunFolder

FAST = {"align": False, "clip_percentiles": None, "crop_size": 12, "progress": False}


def _same_result(a, b):
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert a.uns["extract_crops"] == b.uns["extract_crops"]
    np.testing.assert_array_equal(get_crops(a), get_crops(b))


@pytest.fixture(scope="module")
def screen(small_screen, tmp_path_factory, loader):
    """Six small tiles, their table, and the uninterrupted single-process result."""
    images, table = small_screen(n_tiles=6, cells_per_tile=9)
    out = tmp_path_factory.mktemp("reference")
    reference = extract_crops(
        loader(images), table, out, channel_names=["a", "b"], chunk_cells=5, **FAST
    )
    return images, table, reference, out / "crops.zarr"


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    crash_tile=st.integers(0, 5),
    crash_kind=st.sampled_from(["loader", "before_commit"]),
    n_jobs_crash=st.sampled_from([1, 2]),
    n_jobs_resume=st.sampled_from([1, 2]),
)
def test_crash_at_any_tile_then_resume_equals_uninterrupted(
    screen, loader, same_store, crash_tile, crash_kind, n_jobs_crash, n_jobs_resume
):
    images, table, reference, reference_store = screen
    kwargs = {"channel_names": ["a", "b"], "chunk_cells": 5, **FAST}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        commit = RunFolder.commit_record

        def crash_before_commit(self, record, start, stop):
            if record["label"].endswith(f"tile={crash_tile}"):  # its crops are on disk already
                raise RuntimeError("simulated crash before commit")
            return commit(self, record, start, stop)

        fail_on = crash_tile if crash_kind == "loader" else None
        patch = mock.patch.object(
            RunFolder,
            "commit_record",
            crash_before_commit if crash_kind == "before_commit" else commit,
        )
        with patch, pytest.raises(RuntimeError, match="simulated crash"):
            extract_crops(
                loader(images, fail_on=fail_on), table, out, n_jobs=n_jobs_crash, **kwargs
            )
        log = (out / "extract_log.jsonl").read_text().splitlines()
        assert len(log) - 1 <= crash_tile  # the crashed tile was not committed
        resumed = extract_crops(loader(images), table, out, n_jobs=n_jobs_resume, **kwargs)
        _same_result(resumed, reference)
        same_store(out / "crops.zarr", reference_store)


def _killed_run(images, table, out, loader):
    extract_crops(
        loader(images, exit_on=3), table, out, channel_names=["a", "b"], chunk_cells=5, **FAST
    )


def test_killed_process_leaves_a_stale_lock_and_resumes(screen, loader, tmp_path, same_store):
    images, table, reference, reference_store = screen
    out = tmp_path / "run"
    process = multiprocessing.get_context("fork").Process(
        target=_killed_run, args=(images, table, out, loader)
    )
    process.start()
    process.join(60)
    assert process.exitcode == 3
    assert json.loads((out / "crops.zarr.lock").read_text())["pid"] == process.pid
    resumed = extract_crops(
        loader(images), table, out, channel_names=["a", "b"], chunk_cells=5, **FAST
    )
    _same_result(resumed, reference)
    same_store(out / "crops.zarr", reference_store)
    assert not (out / "crops.zarr.lock").exists()


def test_second_run_on_a_folder_being_written_is_refused(screen, loader, tmp_path):
    images, table, _, _ = screen
    out = tmp_path / "run"
    first = extract_crops(loader(images), table, out, channel_names=["a", "b"], **FAST)
    # another live process on this host holds the lock
    owner = {"pid": os.getppid(), "host": socket.gethostname(), "time": 0}
    (out / "crops.zarr.lock").write_text(json.dumps(owner))
    with pytest.raises(StoreLockedError, match=rf"written by process {os.getppid()}"):
        extract_crops(loader(images), table, out, channel_names=["a", "b"], overwrite=True, **FAST)
    # nothing was deleted
    assert (out / "extract_log.jsonl").exists() and (out / "cells.h5ad").exists()
    np.testing.assert_array_equal(get_crops(first), linked_store(first).to_numpy())


def test_changed_tile_file_is_cropped_again(tiles, tmp_path, channels, same_store, caplog):
    template, table, images = tiles
    kwargs = {"channel_names": channels, "chunk_cells": 50, "progress": False}
    first = extract_crops(template, table, tmp_path / "run", **kwargs)
    old_id = first.uns["crops"]["store_id"]
    tile_1 = tmp_path / "tiles" / "A1_Tile-1.tif"
    tifffile.imwrite(tile_1, images[1][:, ::-1].copy(), photometric="minisblack")
    with caplog.at_level(logging.WARNING, logger="mcvi_ops.pp._resume"):
        again = extract_crops(template, table, tmp_path / "run", **kwargs)
    assert "tile=1 changed since it was cropped" in caplog.text
    assert "1 of 3 finished tiles kept" in caplog.text
    fresh = extract_crops(template, table, tmp_path / "fresh", **kwargs)
    _same_result(again, fresh)
    same_store(tmp_path / "run" / "crops.zarr", tmp_path / "fresh" / "crops.zarr")
    # the store changed, so it has a new id, and AnnData linked to the old one is told so
    assert again.uns["crops"]["store_id"] != old_id
    with pytest.raises(StoreChangedError, match="was replaced"):
        get_crops(first, [0])


def test_missing_tile_that_appears_is_cropped(small_screen, loader, tmp_path, caplog):
    images, table = small_screen(n_tiles=3)
    folder = tmp_path / "tiles"
    folder.mkdir()
    for tile in (0, 1):
        np.save(folder / f"A1_{tile}.npy", images[tile])
    kwargs = {"channel_names": ["a", "b"], "on_missing_tile": "skip", **FAST}
    before = extract_crops(folder, table, tmp_path / "run", **kwargs)
    assert before.uns["extract_crops"]["n_dropped_missing_tile"] == 7
    np.save(folder / "A1_2.npy", images[2])
    with caplog.at_level(logging.WARNING, logger="mcvi_ops.pp._resume"):
        after = extract_crops(folder, table, tmp_path / "run", **kwargs)
    assert "tile=2 appeared since it was cropped" in caplog.text
    assert after.uns["extract_crops"]["n_dropped_missing_tile"] == 0
    assert set(after.obs["tile"]) == {0, 1, 2}


def test_changed_array_tile_is_cropped_again(small_screen, tmp_path, caplog):
    images, table = small_screen(n_tiles=3)
    kwargs = {"channel_names": ["a", "b"], **FAST}
    extract_crops(dict(images), table, tmp_path / "run", tile_key="tile", **kwargs)
    changed = {**images, 2: images[2] + 1}
    with caplog.at_level(logging.WARNING, logger="mcvi_ops.pp._resume"):
        again = extract_crops(changed, table, tmp_path / "run", tile_key="tile", **kwargs)
    assert "tile=2 changed" in caplog.text
    fresh = extract_crops(changed, table, tmp_path / "fresh", tile_key="tile", **kwargs)
    np.testing.assert_array_equal(get_crops(again), get_crops(fresh))
    # nothing changed: a no-op rerun keeps the store as it is
    store_id = again.uns["crops"]["store_id"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mcvi_ops.pp._resume"):
        rerun = extract_crops(changed, table, tmp_path / "run", tile_key="tile", **kwargs)
    # only the warnings: INFO lines name tmp_path, which holds this test's name ("...changed...")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [] and rerun.uns["crops"]["store_id"] == store_id


def test_incomplete_store_with_every_tile_committed_is_finished(screen, loader, tmp_path):
    images, table, reference, _ = screen
    out = tmp_path / "run"
    kwargs = {"channel_names": ["a", "b"], "chunk_cells": 5, **FAST}
    with mock.patch("mcvi_ops.data._writer.CropWriter.close", side_effect=RuntimeError("killed")):
        with pytest.raises(RuntimeError, match="killed"):
            extract_crops(loader(images), table, out, **kwargs)
    assert not open_crops(out / "crops.zarr", allow_incomplete=True).complete
    calls = []
    resumed = extract_crops(lambda key: calls.append(key) or images[key[1]], table, out, **kwargs)
    assert calls == []  # every tile was committed: only the store is finished
    _same_result(resumed, reference)
