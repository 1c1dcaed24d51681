from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from mcvi_ops.metrics import function_classification, read_gene_groups, recall_difference

DATA = Path(__file__).parents[1] / "data" / "relationships"


def _guides(separation, seed=0, n_genes_per_group=6, n_groups=3, guides_per_gene=4):
    rng = np.random.default_rng(seed)
    rows, x = [], []
    centers = separation * np.eye(n_groups, 5)
    for g in range(n_groups):
        for k in range(n_genes_per_group):
            gene = f"G{g}_{k}"
            for s in range(guides_per_gene):
                rows.append({"sgRNA": f"{gene}_sg{s}", "gene_symbol": gene, "group": f"grp{g}"})
                x.append(centers[g] + rng.normal(size=5))
    for s in range(5):
        rows.append({"sgRNA": f"ctrl{s}", "gene_symbol": "nontargeting", "group": None})
        x.append(rng.normal(size=5))
    obs = pd.DataFrame(rows).set_index("sgRNA")
    obs.index.name = None
    adata = ad.AnnData(obs=obs)
    adata.obsm["X_emb"] = np.asarray(x)
    return adata


def test_separable_groups_are_recalled_and_genes_do_not_leak():
    guides = _guides(separation=20)
    res = function_classification(guides, labels="group", use_rep="X_emb", n_splits=3)
    np.testing.assert_allclose(res["confusion"].to_numpy(), np.eye(3))
    assert res["recall"]["recall"].tolist() == [1.0, 1.0, 1.0]
    assert res["recall"]["n_genes"].tolist() == [6, 6, 6]
    assert res["summary"]["balanced_accuracy"].iloc[0] == 1.0
    assert res["summary"]["chance"].iloc[0] == pytest.approx(1 / 3)
    pred = res["predictions"].join(guides.obs["gene_symbol"])
    assert (pred.groupby("gene_symbol")["fold"].nunique() == 1).all()
    assert len(pred) == 72  # the 5 unlabelled controls are left out
    assert "X_emb" in guides.uns["function_classification"]


def test_labels_from_mapping_and_real_groups_file():
    groups = read_gene_groups(DATA / "functional_clusters_subset.json")
    genes = list(groups)
    rng = np.random.default_rng(3)
    group_names = sorted(set(groups.values()))
    centers = {g: 8 * rng.normal(size=4) for g in group_names}
    x = np.array([centers[groups[g]] + rng.normal(size=4) for g in genes])
    gene_adata = ad.AnnData(x, obs=pd.DataFrame(index=genes))
    res = function_classification(gene_adata, labels=groups, n_splits=3)
    assert list(res["recall"].index) == group_names
    assert res["summary"]["balanced_accuracy"].iloc[0] > 0.8


def test_recall_difference_hand_computed():
    def result(values):
        return {"recall": pd.DataFrame({"recall": values}, index=["a", "b", "c"])}

    diff = recall_difference(result([0.5, 0.9, 0.2]), result([0.25, 0.9, 0.6]))
    assert list(diff.index) == ["a", "b", "c"]
    np.testing.assert_allclose(diff["difference"], [0.25, 0.0, -0.4])
    assert list(diff.columns) == ["recall_salient", "recall_background", "difference"]


def test_errors():
    guides = _guides(separation=1)
    guides.obs["one"] = "grp"
    with pytest.raises(ValueError, match="at least 2 groups"):
        function_classification(guides, labels="one", use_rep="X_emb")
    with pytest.raises(KeyError, match="Did not find the label column"):
        function_classification(guides, labels="cluster", use_rep="X_emb")
    with pytest.raises(ValueError, match="None of the 2 genes"):
        function_classification(guides, labels={"X": "a", "Y": "b"}, use_rep="X_emb")
    with pytest.raises(KeyError, match=r"Did not find \.obsm"):
        function_classification(guides, labels="group", use_rep="X_vae")
    with pytest.raises(TypeError, match="function_classification"):
        recall_difference({}, {})
