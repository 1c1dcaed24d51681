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
    mcvi_ops.pp.derive_covariates(adata)
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
    assert set(res["metric"]) == {
        "average_precision",
        *(f"recall{tail}_{p}" for tail in ("", "_top", "_bottom") for p in (5, 10)),
    }
    assert res["n_genes"].iloc[0] <= genes.n_obs


def test_map_metrics_on_simulated_screen(screen, tmp_path):
    adata = screen.copy()
    mcvi_ops.pp.derive_covariates(adata)
    tl.feature_embedding(adata, batch_key="batch", n_comps=3)
    guides = tl.aggregate(adata, use_rep="X_features_pca", level="guide")
    assert guides.n_vars == 3  # the profiles are .X too
    activity = metrics.phenotypic_activity(guides, use_rep="X_features_pca", null_size=2000)
    truth = adata.uns["ground_truth"]
    kind = truth["effect_kind"].reindex(activity["gene_symbol"]).to_numpy()
    ap = activity["mean_average_precision"].to_numpy()
    # genes with a novel simulated phenotype are more distinct from the controls than genes
    # without an effect (3,000 cells are too few to call them active after FDR correction)
    assert ap[kind == "novel"].mean() > ap[kind == "none"].mean() + 0.05
    summary = guides.uns["phenotypic_activity"]["X_features_pca"]["summary"]
    assert summary["n_perturbations"] == truth.shape[0]
    assert summary["fraction_active"] == activity["active"].mean()

    # the complex membership written as a complex list, as the simulator does
    path = tmp_path / "complexes.tsv"
    members = truth[truth["complex"] != "none"].groupby("complex", observed=True)
    path.write_text("".join(f"{c}\t{' '.join(m.index)}\n" for c, m in members))
    genes = tl.aggregate(adata, use_rep="X_features_pca")
    consistency = metrics.phenotypic_consistency(
        genes, use_rep="X_features_pca", relationships=path, null_size=2000
    )
    assert set(consistency["gene"]) == set(truth.index[truth["complex"] != "none"])
    assert (
        consistency["mean_average_precision"].mean()
        > consistency["mean_normalized_average_precision"].mean()
    )
