from __future__ import annotations

import time
import uuid
from collections import Counter

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField

from mcvi_ops.data import ImageField, link_crops, write_crops
from mcvi_ops.dataloaders import CropDataLoader, CropDataSplitter
from mcvi_ops.dataloaders._sampler import BalancedChunkSampler

CHUNK = 8


def make_manager(
    n_cells: int = 120,
    *,
    n_control: int = 30,
    seed: int = 0,
    chunk_cells: int = CHUNK,
    shuffled_crops: bool = False,
    url: str | None = None,
) -> tuple[AnnDataManager, object]:
    """Tiny screen: controls are 'a_control' (sorts first, so code 0), crops in a memory store."""
    rng = np.random.default_rng(seed)
    crops = rng.integers(0, 60000, (n_cells, 2, 16, 16), dtype=np.uint16)
    store = write_crops(
        url or f"memory://test-loader-{uuid.uuid4().hex}.zarr",
        crops,
        channel_names=["DAPI", "tubulin"],
        chunk_cells=chunk_cells,
    )
    genes = np.array(["a_control"] * n_control + [f"g{i % 5}" for i in range(n_cells - n_control)])
    rng.shuffle(genes)
    obs = pd.DataFrame(
        {
            "gene_symbol": genes,
            "plate": rng.choice(["p1", "p2"], n_cells),
            "crop_index": rng.permutation(n_cells) if shuffled_crops else np.arange(n_cells),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    adata = ad.AnnData(obs=obs)
    link_crops(adata, store, index_key="crop_index")
    manager = AnnDataManager(
        fields=[
            ImageField("crops"),
            CategoricalObsField("perturbation", "gene_symbol"),
            CategoricalObsField("batch", "plate"),
        ]
    )
    manager.register_fields(adata)
    return manager, store


def make_sampler(n=200, n_control=50, **kwargs):
    rows = np.arange(n)
    is_control = np.zeros(n, dtype=bool)
    is_control[np.random.default_rng(1).choice(n, n_control, replace=False)] = True
    defaults = {"batch_size": 20, "window_chunks": 2, "seed": 0}
    return (
        rows,
        is_control,
        BalancedChunkSampler(rows, rows // 10, is_control=is_control, **{**defaults, **kwargs}),
    )


# --- sampler ---------------------------------------------------------------------------------
def test_balanced_batches_and_every_perturbed_once():
    rows, is_control, sampler = make_sampler()
    batches = list(sampler)
    assert len(batches) == len(sampler) == 15  # 150 perturbed / 10 per batch
    for batch in batches:
        assert len(batch) == 20
        assert is_control[batch].sum() == 10
    perturbed = [i for batch in batches for i in batch if not is_control[i]]
    assert sorted(perturbed) == sorted(rows[~is_control].tolist())


def test_last_batch_smaller_and_drop_last():
    rows, is_control, sampler = make_sampler(n=200, n_control=50, batch_size=16)
    batches = list(sampler)
    assert len(batches) == 19  # ceil(150 / 8)
    last = batches[-1]
    assert len(last) == 12 and is_control[last].sum() == 6
    _, _, dropping = make_sampler(n=200, n_control=50, batch_size=16, drop_last=True)
    assert len(list(dropping)) == len(dropping) == 18
    assert all(len(b) == 16 for b in dropping)


def test_controls_cycled_and_reshuffled():
    rows, is_control, sampler = make_sampler(n=100, n_control=10, batch_size=20)
    controls = [i for batch in sampler for i in batch if is_control[i]]
    assert len(controls) == 90
    counts = Counter(controls)
    assert set(counts) == set(rows[is_control].tolist())
    assert max(counts.values()) - min(counts.values()) <= 1
    assert controls[:10] != controls[10:20]  # each pass is reshuffled


def test_batches_are_chunk_local():
    rows = np.arange(2000)
    chunks = rows // 16
    sampler = BalancedChunkSampler(
        rows, chunks, batch_size=64, balanced=False, window_chunks=4, seed=3
    )
    n_chunks = [len(np.unique(chunks[b])) for b in sampler]
    assert max(n_chunks) <= 2 * 4
    # balanced: each half stream is chunk-local (a window of either stream holds a half batch)
    is_control = rows % 2 == 0
    sampler = BalancedChunkSampler(
        rows, chunks, is_control=is_control, batch_size=64, window_chunks=4, seed=3
    )
    for batch in sampler:
        batch = np.asarray(batch)
        for side in (is_control[batch], ~is_control[batch]):
            assert len(np.unique(chunks[batch[side]])) <= 2 * 4
    # ... yet batches mix chunks from far apart in the store
    assert np.ptp(chunks[np.asarray(next(iter(sampler)))]) > 8


def test_deterministic_and_new_order_each_epoch():
    _, _, a = make_sampler(seed=7)
    _, _, b = make_sampler(seed=7)
    assert list(a) == list(b)
    epoch0 = list(a)
    a.set_epoch(1)
    assert list(a) != epoch0
    b.set_epoch(1)
    assert list(a) == list(b)
    _, _, c = make_sampler(seed=8)
    assert list(c) != epoch0


def test_unbalanced_sequential_and_shuffled():
    rows = np.array([5, 3, 9, 1, 7, 0, 2])
    sampler = BalancedChunkSampler(rows, rows // 4, batch_size=3, balanced=False, shuffle=False)
    assert list(sampler) == [[5, 3, 9], [1, 7, 0], [2]]
    shuffled = BalancedChunkSampler(rows, rows // 4, batch_size=3, balanced=False, seed=0)
    flat = [i for b in shuffled for i in b]
    assert sorted(flat) == sorted(rows.tolist())


@pytest.mark.parametrize("balanced", [True, False])
def test_ddp_shards_disjoint_equal_lengths(balanced):
    rows, is_control, _ = make_sampler(n=203, n_control=41)
    kwargs = {"is_control": is_control, "batch_size": 20, "balanced": balanced, "seed": 0}
    shards = [
        list(BalancedChunkSampler(rows, rows // 10, num_replicas=2, rank=r, **kwargs))
        for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1])
    mask = ~is_control if balanced else np.ones(len(rows), dtype=bool)
    main = [{i for b in shard for i in b if mask[i]} for shard in shards]
    assert not main[0] & main[1]
    assert main[0] | main[1] == set(rows[mask].tolist())
    if balanced:
        ctrl = [{i for b in shard for i in b if is_control[i]} for shard in shards]
        assert not ctrl[0] & ctrl[1]
        for shard in shards:
            for batch in shard:
                assert 2 * is_control[batch].sum() == len(batch)


def test_sampler_errors():
    rows = np.arange(10)
    with pytest.raises(ValueError, match="must be an even number"):
        BalancedChunkSampler(rows, rows, is_control=rows < 5, batch_size=7)
    with pytest.raises(ValueError, match="must be an even number >= 2"):
        BalancedChunkSampler(rows, rows, is_control=rows < 5, batch_size=1)
    with pytest.raises(ValueError, match="no control cells"):
        BalancedChunkSampler(rows, rows, is_control=np.zeros(10, bool), batch_size=4)
    with pytest.raises(ValueError, match="no perturbed cells"):
        BalancedChunkSampler(rows, rows, is_control=np.ones(10, bool), batch_size=4)
    with pytest.raises(ValueError, match="one chunk per row"):
        BalancedChunkSampler(rows, rows[:3], balanced=False)
    with pytest.raises(ValueError, match="positive integer"):
        BalancedChunkSampler(rows, rows, balanced=False, batch_size=0)


# --- loader ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cache_chunks", [None, 0, 1])
def test_loader_batches_match_store(cache_chunks):
    manager, store = make_manager(shuffled_crops=True)
    loader = CropDataLoader(
        manager, batch_size=16, shuffle=True, balanced=True, seed=0, cache_chunks=cache_chunks
    )
    adata = manager.adata
    crop_index = adata.obs["crop_index"].to_numpy()
    codes = manager.get_from_registry("perturbation").reshape(-1)
    seen = []
    for rows, batch in zip(loader.sampler, loader, strict=True):
        assert set(batch) == {"X", "crop_index", "perturbation", "batch"}
        # the store's dtype, not float32: the module converts on the device
        assert batch["X"].dtype == torch.uint16 and batch["X"].shape == (len(rows), 2, 16, 16)
        np.testing.assert_array_equal(batch["X"].numpy(), store.take(crop_index[rows]))
        assert batch["perturbation"].dtype == torch.long
        assert batch["perturbation"].shape == (len(rows), 1)
        np.testing.assert_array_equal(batch["perturbation"].numpy()[:, 0], codes[rows])
        assert (batch["perturbation"] == 0).sum() * 2 == len(rows)
        assert batch["batch"].dtype == torch.long
        np.testing.assert_array_equal(batch["crop_index"].numpy()[:, 0], crop_index[rows])
        seen.extend(rows)
    assert set(np.asarray(seen)[codes[seen] != 0]) == set(np.flatnonzero(codes != 0))


def test_loader_sequential_subset():
    manager, store = make_manager()
    indices = np.arange(10, 50)
    loader = CropDataLoader(manager, indices, batch_size=16)
    batches = list(loader)
    assert [len(b["X"]) for b in batches] == [16, 16, 8]
    x = torch.cat([b["X"] for b in batches]).numpy()
    np.testing.assert_array_equal(x, store.take(indices).astype(np.float32))


def test_loader_with_forked_worker_memory_store():
    manager, store = make_manager()
    loader = CropDataLoader(
        manager, batch_size=32, num_workers=1, persistent_workers=False, pin_memory=False
    )
    x = torch.cat([b["X"] for b in loader]).numpy()
    np.testing.assert_array_equal(x, store.to_numpy().astype(np.float32))


def test_loader_balanced_needs_perturbation_field():
    manager, _ = make_manager()
    with pytest.raises(KeyError, match="perturbation field 'missing'"):
        CropDataLoader(manager, balanced=True, perturbation_key="missing", batch_size=8)
    codes = manager.get_from_registry("perturbation").reshape(-1)
    with pytest.raises(ValueError, match="no control cells"):
        CropDataLoader(manager, np.flatnonzero(codes != 0), balanced=True, batch_size=8)


# --- splitter --------------------------------------------------------------------------------
def test_splitter_stratified_and_deterministic():
    manager, _ = make_manager(n_cells=200, n_control=40)
    codes = manager.get_from_registry("perturbation").reshape(-1)
    splitter = CropDataSplitter(
        manager, train_size=0.8, validation_size=0.1, batch_size=8, seed=0, load_sparse_tensor=False
    )
    splitter.setup()
    counts = [
        (int((codes[idx] == 0).sum()), int((codes[idx] != 0).sum()))
        for idx in (splitter.train_idx, splitter.val_idx, splitter.test_idx)
    ]
    assert counts == [(32, 128), (4, 16), (4, 16)]
    all_idx = np.concatenate([splitter.train_idx, splitter.val_idx, splitter.test_idx])
    assert sorted(all_idx.tolist()) == list(range(200))
    again = CropDataSplitter(manager, train_size=0.8, validation_size=0.1, batch_size=8, seed=0)
    np.testing.assert_array_equal(again.val_idx, splitter.val_idx)
    other = CropDataSplitter(manager, train_size=0.8, validation_size=0.1, batch_size=8, seed=1)
    assert not np.array_equal(other.val_idx, splitter.val_idx)

    train = splitter.train_dataloader()
    batch = next(iter(train))
    assert (batch["perturbation"] == 0).sum() * 2 == len(batch["X"]) == 8
    assert len(train) == 128 // 4
    val = splitter.val_dataloader()
    first = list(val.sampler)
    val.sampler.set_epoch(3)
    assert list(val.sampler) == first
    assert sorted({r for b in first for r in b}) == splitter.val_idx.tolist()
    assert splitter.test_dataloader() is not None


def test_splitter_ddp_and_errors():
    manager, _ = make_manager(n_cells=200, n_control=40)
    splitter = CropDataSplitter(manager, batch_size=8, distributed_sampler=True, seed=0)
    codes = manager.get_from_registry("perturbation").reshape(-1)
    shards = []
    for rank in range(2):
        splitter._replicas = (2, rank)  # what setup() takes from a trainer with world_size 2
        shards.append(list(splitter.train_dataloader().sampler))
    assert len(shards[0]) == len(shards[1])
    perturbed = [{i for b in shard for i in b if codes[i] != 0} for shard in shards]
    assert not perturbed[0] & perturbed[1]
    train = splitter.train_idx
    assert perturbed[0] | perturbed[1] == set(train[codes[train] != 0].tolist())

    with pytest.raises(ValueError, match="no control cells"):
        CropDataSplitter(manager, batch_size=8, control_code=99)
    with pytest.raises(ValueError, match="no perturbed cells"):
        onlycontrol, _ = make_manager(n_cells=40, n_control=40)
        CropDataSplitter(onlycontrol, batch_size=8)
    with pytest.raises(ValueError, match="must be an even number"):
        CropDataSplitter(manager, batch_size=9).train_dataloader()
    with pytest.raises(ValueError, match="validation_size"):
        CropDataSplitter(manager, train_size=0.9, validation_size=0.5)


def test_splitter_is_an_scvi_data_splitter():
    from scvi.dataloaders import DataSplitter

    manager, _ = make_manager(n_cells=200, n_control=40)
    splitter = CropDataSplitter(manager, train_size=1.0, batch_size=8)
    assert isinstance(splitter, DataSplitter)
    assert splitter.data_loader_cls is CropDataLoader
    assert len(splitter.val_idx) == 0 and splitter.val_dataloader() is None
    with pytest.raises(ValueError, match="which are dense"):
        CropDataSplitter(manager, load_sparse_tensor=True)


# --- workers ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "workers"), [(200, 2), (200, 3), (60, 4), (20, 8)])
def test_sampler_runs_per_worker(n, workers):
    """Worker j of the DataLoader's turn-taking gets run j: contiguous batches of the epoch."""
    rows, is_control, _ = make_sampler(n=n, n_control=n // 4)
    kwargs = {"is_control": is_control, "batch_size": 10, "window_chunks": 2, "seed": 0}
    plain = list(BalancedChunkSampler(rows, rows // 10, **kwargs))
    dealt = list(BalancedChunkSampler(rows, rows // 10, num_workers=workers, **kwargs))
    # unshuffled batches (validation, embedding) keep their order
    unshuffled = {**kwargs, "shuffle": False}
    assert list(BalancedChunkSampler(rows, rows // 10, num_workers=workers, **unshuffled)) == list(
        BalancedChunkSampler(rows, rows // 10, **unshuffled)
    )
    assert sorted(map(tuple, dealt)) == sorted(map(tuple, plain))  # same batches
    per_worker = [dealt[j::workers] for j in range(workers)]
    assert [b for run in per_worker for b in run] == plain  # run j, in order, for worker j
    sizes = [len(run) for run in per_worker]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    if len(plain) > workers:
        assert dealt != plain


def test_loader_two_workers_match_store():
    manager, store = make_manager(n_cells=240, n_control=60, shuffled_crops=True)
    loader = CropDataLoader(
        manager, batch_size=16, shuffle=True, balanced=True, seed=0, num_workers=2
    )
    assert loader.pin_memory is torch.cuda.is_available()
    assert loader.persistent_workers
    crop_index = manager.adata.obs["crop_index"].to_numpy()
    codes = manager.get_from_registry("perturbation").reshape(-1)
    for epoch in range(2):
        loader.set_epoch(epoch)
        # every batch kept: slots run out (batches then come the usual way), none overwritten
        batches = list(zip(loader.sampler, loader, strict=True))
        assert len(batches) == len(loader)
        for rows, batch in batches:
            assert batch["X"].dtype == torch.uint16
            np.testing.assert_array_equal(batch["X"].numpy(), store.take(crop_index[rows]))
            np.testing.assert_array_equal(batch["perturbation"].numpy()[:, 0], codes[rows])
            np.testing.assert_array_equal(batch["crop_index"].numpy()[:, 0], crop_index[rows])


def test_loader_workers_survive_epochs_cut_short():
    manager, store = make_manager(n_cells=240, n_control=60)
    loader = CropDataLoader(manager, batch_size=8, num_workers=2, prefetch_factor=2)
    for _ in range(3):  # batches read ahead and dropped must free their slots
        for i, _batch in enumerate(loader):
            if i == 1:
                break
    del _batch
    x = np.concatenate([b["X"].numpy().copy() for b in loader])
    np.testing.assert_array_equal(x, store.to_numpy())
    assert loader.dataset._pool.busy.sum() == 0  # every slot free after a whole epoch


def test_slot_pool_hands_out_views_freed_with_the_tensor():
    from mcvi_ops.dataloaders import _slots

    pool = _slots.SlotPool(2, 2, (3, 1, 2, 2), torch.uint16)
    slot = pool.acquire(1)
    pool.data[1, slot].numpy()[:] = 7
    batch = _slots.SlotBatch(pool, 1, slot, 2, "X", {"perturbation": np.array([[0], [3]])})
    out = batch.to_tensors()
    del batch
    assert out["X"].shape == (2, 1, 2, 2) and (out["X"] == 7).all()
    assert out["perturbation"].tolist() == [[0], [3]]
    first_row = out["X"][0]
    del out
    assert pool.busy[1, slot] == 1  # a view of the slot is still alive
    del first_row
    assert pool.busy[1, slot] == 0
    # a batch dropped unread frees its slot too
    slot = pool.acquire(0)
    _slots.SlotBatch(pool, 0, slot, 1, "X", {})
    assert pool.busy[0, slot] == 0


def test_slot_pool_full_falls_back():
    from mcvi_ops.dataloaders import _slots

    pool = _slots.SlotPool(1, 1, (1, 1, 1, 1), torch.uint8)
    assert pool.acquire(0) == 0
    start = time.monotonic()
    assert pool.acquire(0) is None  # the worker then sends the batch the usual way
    assert time.monotonic() - start < 1.0


def test_loader_zarrs_codec_pipeline(tmp_path):
    pytest.importorskip("zarrs")
    manager, store = make_manager(url=str(tmp_path / "crops.zarr"), shuffled_crops=True)
    crop_index = manager.adata.obs["crop_index"].to_numpy()
    loader = CropDataLoader(
        manager, batch_size=16, balanced=True, shuffle=True, seed=0, codec_pipeline="zarrs"
    )
    pipeline = loader.dataset.store.array._async_array.codec_pipeline
    assert type(pipeline).__name__ == "ZarrsCodecPipeline"
    for rows, batch in zip(loader.sampler, loader, strict=True):
        np.testing.assert_array_equal(batch["X"].numpy(), store.take(crop_index[rows]))
    with pytest.raises(ValueError, match="'zarr' or 'zarrs'"):
        CropDataLoader(manager, codec_pipeline="blosc")
