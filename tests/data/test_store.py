from __future__ import annotations

import json
import multiprocessing
import os
import socket
import uuid

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.storage import MemoryStore

from mcvi_ops.data import (
    CropStore,
    CropWriter,
    IncompleteStoreError,
    StoreLockedError,
    open_crops,
    write_crops,
)
from mcvi_ops.data._writer import write_chunk

CHANNELS = ["DAPI", "tubulin", "gH2AX", "phalloidin"]


@pytest.fixture
def crops(rng) -> np.ndarray:
    return rng.integers(0, 60_000, (150, 4, 12, 10), dtype=np.uint16)


@pytest.fixture(params=["local", "memory-url", "memory-store"])
def target(request, tmp_path):
    if request.param == "local":
        return tmp_path / "crops.zarr"
    if request.param == "memory-url":
        return f"memory://test-{request.node.name}.zarr"
    return MemoryStore()


def test_round_trip(target, crops):
    store = write_crops(target, crops, channel_names=CHANNELS, chunk_cells=32, pixel_size=0.3036)
    again = open_crops(store.url)
    assert isinstance(again, CropStore)
    assert again.shape == crops.shape
    assert again.chunk_cells == 32
    assert again.n_chunks == 5
    assert again.channel_names == CHANNELS
    assert again.pixel_size == pytest.approx(0.3036)
    assert again.dtype == np.uint16
    np.testing.assert_array_equal(again.to_numpy(), crops)


def test_chunked_along_cells_and_compressed(tmp_path, crops):
    store = write_crops(tmp_path / "c.zarr", crops, channel_names=CHANNELS, chunk_cells=16)
    assert store.array.chunks == (16, 4, 12, 10)
    assert len(store.array.compressors) == 1


def test_fancy_indexing_matches_numpy(tmp_path, crops, rng):
    store = write_crops(tmp_path / "c.zarr", crops, channel_names=CHANNELS, chunk_cells=16)
    for indices in (
        rng.integers(0, 150, 300),  # repeats, random order
        np.array([149, 0, 0, 77, -1, -150]),  # negative indices
        np.array([], dtype=int),
        [5],
        rng.random(150) > 0.5,  # boolean mask
    ):
        np.testing.assert_array_equal(store[indices], crops[indices])
    np.testing.assert_array_equal(store[3], crops[3])
    np.testing.assert_array_equal(store[10:40:3], crops[10:40:3])
    np.testing.assert_array_equal(store[[4, 2], 1], crops[[4, 2], 1])


def test_take_reads_each_touched_chunk_once(tmp_path, crops, monkeypatch):
    store = write_crops(tmp_path / "c.zarr", crops, channel_names=CHANNELS, chunk_cells=16)
    reads = []
    array = store.array

    class Spy:
        def __getattr__(self, name):
            return getattr(array, name)

        def __getitem__(self, key):
            reads.append(key)
            return array[key]

    monkeypatch.setattr(store, "_array", Spy(), raising=False)
    indices = np.array([3, 100, 5, 3, 17, 101, 140])
    out = store.take(indices)
    np.testing.assert_array_equal(out, crops[indices])
    touched = {i // 16 for i in indices}
    assert len(reads) == len(touched)


def test_streaming_writer_more_rows_than_a_batch(tmp_path, crops):
    with CropWriter(
        tmp_path / "s.zarr",
        n_channels=4,
        crop_size=(12, 10),
        channel_names=CHANNELS,
        chunk_cells=16,
    ) as writer:
        for start in range(0, 150, 7):
            writer.append(crops[start : start + 7])
        assert writer.n_written == 150
    store = open_crops(tmp_path / "s.zarr")
    np.testing.assert_array_equal(store.to_numpy(), crops)
    assert [first for first, _ in store.iter_chunks()] == list(range(0, 150, 16))


def test_float32_crops(tmp_path, rng):
    crops = rng.normal(size=(20, 2, 8, 8)).astype(np.float32)
    store = write_crops(tmp_path / "f.zarr", crops, channel_names=["a", "b"])
    np.testing.assert_array_equal(store[[3, 1]], crops[[3, 1]])
    assert store.dtype == np.float32


def test_default_chunk_size_is_bounded(tmp_path, crops):
    store = write_crops(tmp_path / "d.zarr", crops, channel_names=CHANNELS)
    assert 16 <= store.chunk_cells <= 1024


def test_errors(tmp_path, crops):
    with pytest.raises(ValueError, match="4 dimensions"):
        write_crops(tmp_path / "a.zarr", crops[0], channel_names=CHANNELS)
    with pytest.raises(ValueError, match="one name per channel"):
        write_crops(tmp_path / "b.zarr", crops, channel_names=["DAPI"])
    with pytest.raises(ValueError, match="unique"):
        write_crops(tmp_path / "c.zarr", crops, channel_names=["a", "a", "b", "c"])
    with pytest.raises(TypeError, match="uint8, uint16 or float32"):
        CropWriter(
            tmp_path / "d.zarr", n_channels=1, crop_size=4, channel_names=["a"], dtype=np.int64
        )
    write_crops(tmp_path / "e.zarr", crops, channel_names=CHANNELS)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_crops(tmp_path / "e.zarr", crops, channel_names=CHANNELS)
    write_crops(tmp_path / "e.zarr", crops[:5], channel_names=CHANNELS, overwrite=True)
    assert open_crops(tmp_path / "e.zarr").n_cells == 5
    with pytest.raises(FileNotFoundError, match="No crop store found"):
        open_crops(tmp_path / "missing.zarr")
    zarr.open_group(tmp_path / "other.zarr", mode="w")
    with pytest.raises(ValueError, match="not an mcvi-ops crop store"):
        open_crops(tmp_path / "other.zarr")
    with pytest.raises(FileNotFoundError, match="in-memory crop store"):
        open_crops("mcvi-memory://does-not-exist")


def test_index_errors(tmp_path, crops):
    store = write_crops(tmp_path / "a.zarr", crops, channel_names=CHANNELS)
    with pytest.raises(IndexError, match="out of range"):
        store[[0, 150]]
    with pytest.raises(IndexError, match="boolean mask"):
        store[np.ones(3, dtype=bool)]
    with pytest.raises(IndexError, match="integers"):
        store[np.array([0.5])]
    with pytest.raises(IndexError, match="Chunk 99"):
        store.read_chunk(99)


def test_writer_rejects_wrong_shapes_and_values(tmp_path):
    writer = CropWriter(tmp_path / "w.zarr", n_channels=2, crop_size=8, channel_names=["a", "b"])
    with pytest.raises(ValueError, match="channel-first"):
        writer.append(np.zeros((3, 8, 8, 2), dtype=np.uint16))
    with pytest.raises(ValueError, match="outside the uint16 range"):
        writer.append(np.full((3, 2, 8, 8), -5.0))
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.append(np.zeros((3, 2, 8, 8), dtype=np.uint16))


# --- identity, integrity and locking -------------------------------------------------------------
def test_store_id_dtype_and_intensity_range(tmp_path, crops):
    store = write_crops(tmp_path / "a.zarr", crops, channel_names=CHANNELS, chunk_cells=64)
    other = write_crops(tmp_path / "b.zarr", crops, channel_names=CHANNELS, chunk_cells=64)
    assert str(uuid.UUID(store.store_id)) == store.store_id
    assert store.store_id != other.store_id
    again = open_crops(tmp_path / "a.zarr")
    assert again.store_id == store.store_id
    assert again.format_attrs["dtype"] == "uint16"
    assert again.reference()["store_id"] == store.store_id
    # three chunks of 64 cells: all are sampled, so the range is the exact percentiles
    flat = crops.transpose(1, 0, 2, 3).reshape(4, -1)
    expected = np.percentile(flat, [0.1, 99.9], axis=1).T
    np.testing.assert_allclose(again.intensity_range, expected)
    assert again.format_attrs["intensity_percentiles"] == [0.1, 99.9]
    assert again.complete and again.nonfinite == {"policy": "raise", "n_values": 0, "n_cells": 0}


def test_intensity_range_samples_few_chunks(tmp_path, rng):
    crops = np.stack([np.full((1, 4, 4), i, dtype=np.uint16) for i in range(400)])
    store = write_crops(tmp_path / "a.zarr", crops, channel_names=["DAPI"], chunk_cells=16)
    low, high = store.intensity_range[0]
    # chunks 0, 8, 16 and 24 of 25 are read: cells 0-15, 128-143, 256-271, 384-399
    sample = np.r_[0:16, 128:144, 256:272, 384:400].repeat(16)
    assert (low, high) == tuple(np.percentile(sample, [0.1, 99.9]))


def test_writer_left_by_an_exception_is_incomplete(tmp_path, crops):
    path = tmp_path / "a.zarr"
    with pytest.raises(RuntimeError, match="boom"):
        with CropWriter(
            path, n_channels=4, crop_size=(12, 10), channel_names=CHANNELS, chunk_cells=16
        ) as writer:
            writer.append(crops[:40])
            raise RuntimeError("boom")
    with pytest.raises(IncompleteStoreError, match=r"incomplete.*allow_incomplete=True"):
        open_crops(path)
    partial = open_crops(path, allow_incomplete=True)
    assert not partial.complete
    np.testing.assert_array_equal(partial[:32], crops[:32])  # full chunks were written
    assert not (tmp_path / "a.zarr.lock").exists()  # the lock was released
    write_crops(path, crops, channel_names=CHANNELS, overwrite=True)
    assert open_crops(path).complete


def test_store_changed_after_completion_is_refused(tmp_path, crops):
    write_crops(tmp_path / "a.zarr", crops, channel_names=CHANNELS, chunk_cells=16)
    array = zarr.open_group(tmp_path / "a.zarr", mode="r+")["crops"]
    array.resize((100, *array.shape[1:]))
    with pytest.raises(IncompleteStoreError, match="finished with 150 crops but now has 100"):
        open_crops(tmp_path / "a.zarr")


def test_store_of_format_1_still_opens(tmp_path, crops):
    group = zarr.open_group(tmp_path / "old.zarr", mode="w", zarr_format=3)
    group.attrs.update({"format": "mcvi-ops-crops", "format_version": 1})
    array = group.create_array("crops", shape=crops.shape, chunks=(16, 4, 12, 10), dtype="uint16")
    array[:] = crops
    array.attrs["channel_names"] = CHANNELS
    store = open_crops(tmp_path / "old.zarr")
    assert store.complete and store.store_id is None and store.intensity_range is None
    np.testing.assert_array_equal(store[[3, 1]], crops[[3, 1]])
    group.attrs["format_version"] = 99
    with pytest.raises(ValueError, match="newer than this"):
        open_crops(tmp_path / "old.zarr")


def _hold_writer(path, ready, release):
    writer = CropWriter(path, n_channels=1, crop_size=4, channel_names=["DAPI"], chunk_cells=4)
    writer.append(np.ones((6, 1, 4, 4), dtype=np.uint16))
    ready.set()
    release.wait(30)
    writer.close()


def test_second_process_cannot_replace_a_store_being_written(tmp_path):
    path = str(tmp_path / "a.zarr")
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_writer, args=(path, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(StoreLockedError, match=rf"written by process {holder.pid}"):
            write_crops(
                path, np.zeros((3, 1, 4, 4), np.uint16), channel_names=["x"], overwrite=True
            )
    finally:
        release.set()
        holder.join(30)
    assert holder.exitcode == 0
    store = open_crops(path)
    assert store.n_cells == 6 and store.to_numpy().min() == 1  # untouched by the second writer


def _killed_writer(path):
    writer = CropWriter(path, n_channels=1, crop_size=4, channel_names=["DAPI"], chunk_cells=4)
    writer.append(np.ones((9, 1, 4, 4), dtype=np.uint16))
    writer.flush()
    os._exit(1)  # like SIGKILL: no cleanup, the lock file stays


def test_killed_writer_leaves_an_incomplete_store_and_a_stale_lock(tmp_path):
    path = str(tmp_path / "a.zarr")
    process = multiprocessing.get_context("fork").Process(target=_killed_writer, args=(path,))
    process.start()
    process.join(30)
    assert process.exitcode == 1
    lock = json.loads((tmp_path / "a.zarr.lock").read_text())
    assert lock["pid"] == process.pid and lock["host"] == socket.gethostname()
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        open_crops(path)
    assert open_crops(path, allow_incomplete=True).n_cells == 9
    # the writer's process is gone, so its lock is stale and a new writer takes over
    store = write_crops(
        path, np.zeros((2, 1, 4, 4), np.uint16), channel_names=["x"], overwrite=True
    )
    assert store.n_cells == 2
    assert not (tmp_path / "a.zarr.lock").exists()


def test_lock_held_on_another_host_is_respected(tmp_path, crops):
    write_crops(tmp_path / "a.zarr", crops, channel_names=CHANNELS)
    lock = tmp_path / "a.zarr.lock"
    lock.write_text(json.dumps({"pid": 1, "host": "other-node", "time": 0}))
    with pytest.raises(StoreLockedError, match=r"process 1 on host 'other-node'.*delete the lock"):
        write_crops(tmp_path / "a.zarr", crops, channel_names=CHANNELS, overwrite=True)
    assert open_crops(tmp_path / "a.zarr").n_cells == 150
    lock.unlink()
    write_crops(tmp_path / "a.zarr", crops[:3], channel_names=CHANNELS, overwrite=True)


def test_resume_continues_byte_for_byte(tmp_path, crops, files_of):
    kwargs = {"n_channels": 4, "crop_size": (12, 10), "channel_names": CHANNELS, "chunk_cells": 16}
    write_crops(tmp_path / "ref.zarr", crops, channel_names=CHANNELS, chunk_cells=16)
    writer = CropWriter(tmp_path / "run.zarr", **kwargs)
    writer.append(crops[:70])
    writer.flush()
    writer.abort()  # crashed after 70 rows; only the first 37 count
    first_id = open_crops(tmp_path / "run.zarr", allow_incomplete=True).store_id
    with CropWriter(tmp_path / "run.zarr", resume_at=37, **kwargs) as writer:
        assert writer.n_written == 37
        writer.append(crops[37:100])
        writer.append(crops[100:])
    store = open_crops(tmp_path / "run.zarr")
    assert store.store_id == first_id  # an unfinished store keeps its id
    np.testing.assert_array_equal(store.to_numpy(), crops)
    ref, run = files_of(tmp_path / "ref.zarr"), files_of(tmp_path / "run.zarr")
    assert {k: v for k, v in ref.items() if k != "zarr.json"} == {
        k: v for k, v in run.items() if k != "zarr.json"
    }
    # reopening a finished store to change it gives it a new id
    with CropWriter(tmp_path / "run.zarr", resume_at=150, **kwargs):
        pass
    assert open_crops(tmp_path / "run.zarr").store_id != first_id


def test_resume_checks_layout_and_length(tmp_path, crops):
    kwargs = {"n_channels": 4, "crop_size": (12, 10), "channel_names": CHANNELS, "chunk_cells": 16}
    write_crops(tmp_path / "a.zarr", crops, channel_names=CHANNELS, chunk_cells=16)
    with pytest.raises(ValueError, match=r"Cannot resume.*chunk cells.*overwrite=True"):
        CropWriter(tmp_path / "a.zarr", resume_at=10, **{**kwargs, "chunk_cells": 32})
    with pytest.raises(ValueError, match="holds only 150 crops"):
        CropWriter(tmp_path / "a.zarr", resume_at=151, **kwargs)
    with pytest.raises(ValueError, match="not both"):
        CropWriter(tmp_path / "a.zarr", resume_at=1, overwrite=True, **kwargs)
    assert not (tmp_path / "a.zarr.lock").exists()  # failed writers release the lock


def test_reserved_rows_written_by_chunks(tmp_path, crops):
    writer = CropWriter(
        tmp_path / "a.zarr",
        n_channels=4,
        crop_size=(12, 10),
        channel_names=CHANNELS,
        chunk_cells=16,
    )
    writer.reserve(200)
    write_chunk(writer.url, 16, crops[16:32])
    write_chunk(writer.url, 0, crops[:16])
    write_chunk(writer.url, 32, crops[32:40])  # the last, partial chunk
    with pytest.raises(ValueError, match="chunk boundary"):
        write_chunk(writer.url, 5, crops[:16])
    with pytest.raises(ValueError, match="float32"):
        write_chunk(writer.url, 48, crops[:16].astype(np.float32))
    with pytest.raises(RuntimeError, match="reserved"):
        writer.append(crops[:1])
    with pytest.raises(ValueError, match="between 0 and 200"):
        writer.close()
    store = writer.close(n_cells=40)
    np.testing.assert_array_equal(open_crops(store.url).to_numpy(), crops[:40])
    with pytest.raises(ValueError, match="open CropWriter"):
        write_chunk(store.url, 0, crops[:16])


# --- values ----------------------------------------------------------------------------------
def test_nonfinite_crops_raise_naming_cells_or_are_zeroed(tmp_path, rng):
    crops = rng.normal(size=(30, 2, 6, 6)).astype(np.float32)
    crops[4, 1, 2, 2] = np.nan
    crops[17, 0, :2, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 crops hold NaN.*row 4, row 17.*nonfinite='zero'"):
        write_crops(tmp_path / "a.zarr", crops, channel_names=["a", "b"])
    writer = CropWriter(
        tmp_path / "b.zarr", n_channels=2, crop_size=6, channel_names=["a", "b"], dtype=np.float32
    )
    with pytest.raises(ValueError, match=r"cells 'cell4', 'cell17'"):
        writer.append(crops, cell_names=[f"cell{i}" for i in range(30)])
    writer.abort()
    store = write_crops(tmp_path / "c.zarr", crops, channel_names=["a", "b"], nonfinite="zero")
    assert store.nonfinite == {"policy": "zero", "n_values": 3, "n_cells": 2}
    out = store.to_numpy()
    assert np.isfinite(out).all() and out[4, 1, 2, 2] == 0 and (out[17, 0, :2, 0] == 0).all()
    np.testing.assert_array_equal(out[5], crops[5])
    with pytest.raises(ValueError, match="nonfinite must be"):
        write_crops(tmp_path / "d.zarr", crops, channel_names=["a", "b"], nonfinite="clip")


def test_types_float32_cannot_hold_and_channel_name_strings(tmp_path):
    small = np.arange(2 * 4 * 4, dtype=np.int64).reshape(2, 1, 4, 4)
    store = write_crops(tmp_path / "a.zarr", small, channel_names=["a"])
    assert store.dtype == np.float32
    np.testing.assert_array_equal(store.to_numpy(), small)
    for dtype in (np.int32, np.int64, np.uint32):
        big = small.astype(dtype)
        big[1, 0, 0, 0] = 2**24 + 1
        with pytest.raises(ValueError, match=rf"{np.dtype(dtype)} crops.*2\*\*24.*row 1"):
            write_crops(tmp_path / f"{np.dtype(dtype)}.zarr", big, channel_names=["a"])
    huge = np.zeros((3, 1, 2, 2))
    huge[2, 0, 0, 0] = 1e39
    with pytest.raises(ValueError, match=r"float32 range.*row 2"):
        write_crops(tmp_path / "f.zarr", huge, channel_names=["a"])
    with pytest.raises(ValueError, match=r"got the string 'abcd'.*\['abcd'\]"):
        write_crops(tmp_path / "s.zarr", np.zeros((2, 4, 2, 2), np.uint16), channel_names="abcd")


def test_unreachable_remote_store_names_the_url():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/crops.zarr"
    with pytest.raises(ConnectionError, match=rf"Cannot reach the crop store at {url}"):
        open_crops(url)


# --- indexing as numpy, for any index array ------------------------------------------------------
@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    crops = np.random.default_rng(1).integers(0, 1000, (53, 2, 3, 3), dtype=np.uint16)
    path = tmp_path_factory.mktemp("hyp") / "s.zarr"
    return write_crops(path, crops, channel_names=["a", "b"], chunk_cells=8), crops


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_indexing_equals_numpy(small_store, data):
    store, crops = small_store
    n = len(crops)
    kind = data.draw(st.sampled_from(["ints", "mask", "slice"]))
    if kind == "ints":
        key = np.array(data.draw(st.lists(st.integers(-n, n - 1), max_size=40)), dtype=np.int64)
    elif kind == "mask":
        key = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    else:
        bounds = st.one_of(st.none(), st.integers(-n - 5, n + 5))
        step = st.one_of(st.none(), st.integers(1, 7))
        key = slice(data.draw(bounds), data.draw(bounds), data.draw(step))
    np.testing.assert_array_equal(store[key], crops[key])
    if kind == "ints":
        np.testing.assert_array_equal(store.take(list(key)), crops[key])
