"""End-to-end run of the analysis functions on the simulated screen (feature baseline)."""

import numpy as np
import pytest

import mcvi_ops
from mcvi_ops import metrics, tl


@pytest.fixture(scope="module")
def screen():
    try:
        return mcvi_ops.datasets.synthetic_screen(n_cells=3000, seed=0)
    except NotImplementedError:  # pragma: no cover - simulator not available
        pytest.skip("mcvi_ops.datasets.synthetic_screen is not implemented")


def test_feature_baseline_pipeline(screen):
    adata = screen.copy()
    metrics.derive_covariates(adata)
    assert set(adata.obs["well_position"].dropna().unique()) == {"center", "edge"}
    # 6 x 6 tile grid: the 16 inner tiles are the well centre
    inner = adata.obs["tile"].map(lambda t: 0 < t // 6 < 5 and 0 < t % 6 < 5)
    assert ((adata.obs["well_position"] == "center") == inner).all()

    tl.feature_embedding(adata, batch_key="batch", n_comps=3)
    adata.obsm["X_raw"] = np.log1p(np.asarray(adata.X))
    df = metrics.technical_covariates(
        adata, use_rep=["X_raw", "X_features_pca"], covariates=("batch",)
    ).set_index("representation")
    # per-well channel gains leak into raw intensities; control standardisation removes them
    assert df.loc["X_raw", "auroc"] > df.loc["X_features_pca", "auroc"] + 0.1

    genes = tl.aggregate(adata, use_rep="X_features_pca")
    truth = adata.uns["ground_truth"]
    complexes = {
        name: list(members.index)
        for name, members in truth[truth["complex"] != "none"].groupby("complex")
    }
    res = metrics.known_relationships(
        genes, use_rep="X_features_pca", relationships={"complexes": complexes}, min_pairs=5
    )
    assert set(res["metric"]) == {"average_precision", "recall_5", "recall_10"}
    assert res["n_genes"].iloc[0] <= genes.n_obs
