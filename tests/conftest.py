from __future__ import annotations

import numpy as np
import pytest
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
