"""Embedding on several devices: Lightning DDP on 2 CPU processes gives the single-process result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mcvi_ops
from mcvi_ops.model._distributed import shard_bounds

from .conftest import FAST_MODULE, run_script, tiny_screen_on_disk

SCRIPT = Path(__file__).with_name("ddp_embed.py")


@pytest.mark.parametrize("num_replicas", [1, 2, 3, 7])
def test_shard_bounds_contiguous_nonempty_chunk_aligned(num_replicas):
    chunks = np.repeat(np.arange(10), 16)  # 160 rows in chunks of 16
    bounds = shard_bounds(chunks, num_replicas)
    assert bounds[0] == 0 and bounds[-1] == len(chunks) and len(bounds) == num_replicas + 1
    sizes = np.diff(bounds)
    assert (sizes > 0).all()
    # cut where the chunk changes, and each piece within a chunk of its fair share
    for b in bounds[1:-1]:
        assert b % 16 == 0
    assert np.abs(sizes - len(chunks) / num_replicas).max() <= 16


def test_shard_bounds_small_and_unsorted():
    # every piece non-empty even when chunk changes are far apart
    assert shard_bounds(np.zeros(5, dtype=int), 5).tolist() == [0, 1, 2, 3, 4, 5]
    bounds = shard_bounds(np.array([3, 3, 0, 0, 0, 0, 1, 1, 9]), 3)
    assert bounds.tolist() == [0, 2, 6, 9]
    with pytest.raises(ValueError, match="at least one cell"):
        shard_bounds(np.arange(2), 3)


def test_embed_two_cpu_processes_matches_one(tmp_path):
    screen = tiny_screen_on_disk(tmp_path, chunk_cells=32)
    mcvi_ops.MCVAE.setup_anndata(screen, perturbation_key="gene_symbol")
    model = mcvi_ops.MCVAE(screen, **FAST_MODULE)
    model.is_trained_ = True  # the weights need not be trained to compare embeddings
    model.save(tmp_path / "model")
    subset = np.random.default_rng(0).permutation(screen.n_obs)[:101]
    np.save(tmp_path / "subset.npy", subset)
    expected_all = model.get_latent_representation(kind="both")
    expected_subset = model.get_latent_representation(indices=subset, kind="salient")

    run_script(SCRIPT, tmp_path, cwd=tmp_path, timeout=300)
    for rank in (0, 1):
        every = np.load(tmp_path / f"rank{rank}_all.npy")
        salient = np.load(tmp_path / f"rank{rank}_subset.npy")
        np.testing.assert_allclose(every, expected_all, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(salient, expected_subset, rtol=1e-5, atol=1e-5)
