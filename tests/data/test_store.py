from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.storage import MemoryStore

from mcvi_ops.data import CropStore, CropWriter, open_crops, write_crops

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
