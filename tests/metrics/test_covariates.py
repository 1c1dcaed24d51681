import anndata as ad
import numpy as np
import pandas as pd
import pytest

from mcvi_ops.metrics import technical_covariates
from mcvi_ops.pp import derive_covariates


def test_derive_covariates_hand_computed():
    obs = pd.DataFrame(
        {
            "plate": ["p1", "p1", "p1", "p2"],
            "well": ["A1", "A1", "A2", "A1"],
            "tile": [4, 0, 5, 7],
            "cell_i": [1480.0, 100.0, 1480.0 + 600, 1480.0],
            "cell_j": [1480.0 + 300, 100.0, 1480.0, 2900.0],
        },
        index=list("abcd"),
    )
    adata = ad.AnnData(obs=obs)
    adata.uns["synthetic_screen"] = {"tile_grid": [3, 3], "tile_size": 2960}
    out = derive_covariates(adata)
    assert adata.obs["batch"].tolist() == ["p1_A1", "p1_A1", "p1_A2", "p2_A1"]
    # distances to the tile centre: 300 (centre), 1950 (edge), 600 (in between), 1420 (edge)
    assert out["fov_position"].astype(object).tolist()[:2] == ["center", "edge"]
    assert pd.isna(out["fov_position"].iloc[2])
    assert out["fov_position"].iloc[3] == "edge"
    # the same distances in half tile widths (1480 pixels)
    np.testing.assert_allclose(
        adata.obs["fov_distance"], np.array([300, 1950, 600, 1420]) / 1480, rtol=1e-3
    )
    # 3 x 3 grid: only tile 4 is away from the boundary
    assert adata.obs["well_position"].tolist() == ["center", "edge", "edge", "edge"]

    layout = {4: "edge", 0: "center", 5: "center"}
    derive_covariates(adata, well_layout=layout)
    assert adata.obs["well_position"].astype(object).tolist()[:3] == ["edge", "center", "center"]
    assert pd.isna(adata.obs["well_position"].iloc[3])

    derive_covariates(adata, tile_grid=[2, 5], tile_order="column-major")
    # column-major on 2 rows: tile 4 -> (0, 2), 5 -> (1, 2), 7 -> (1, 3): rows 0/1 are edges
    assert (adata.obs["well_position"] == "edge").all()
    with pytest.raises(ValueError, match="tile_grid"):
        derive_covariates(adata, tile_grid=[2, 2])


def _screen(n=900, seed=0):
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(
        {
            "batch": rng.choice(["w1", "w2", "w3"], n),
            "fov_position": rng.choice(["center", "edge"], n),
            "well_position": rng.choice(["center", "edge"], n),
            "gene_symbol": np.where(rng.random(n) < 0.8, "nontargeting", "G1"),
        },
        index=np.arange(n).astype(str),
    )
    adata = ad.AnnData(obs=obs)
    onehot = pd.get_dummies(obs["batch"]).to_numpy(dtype=float)
    adata.obsm["X_batchy"] = np.c_[3 * onehot, rng.normal(size=(n, 5))]
    adata.obsm["X_noise"] = rng.normal(size=(n, 8))
    return adata


def test_batch_encoding_scores_high_noise_at_chance():
    adata = _screen()
    df = technical_covariates(adata, use_rep=["X_batchy", "X_noise"])
    res = df.set_index(["representation", "covariate"])
    assert res.loc[("X_batchy", "batch"), "auroc"] > 0.95
    assert res.loc[("X_batchy", "batch"), "macro_f1"] > 0.9
    for cov in ("batch", "fov_position", "well_position"):
        assert 0.35 < res.loc[("X_noise", cov), "auroc"] < 0.65
        chance = res.loc[("X_noise", cov), "f1_chance"]
        assert abs(res.loc[("X_noise", cov), "macro_f1"] - chance) < 0.15
    assert res.loc[("X_noise", "fov_position"), "n_batches"] == 3
    assert res.loc[("X_noise", "fov_position"), "scope"] == "within-batch median"
    assert (
        res.loc[("X_noise", "batch"), "n_cells"]
        == (adata.obs["gene_symbol"] == "nontargeting").sum()
    )
    per_batch = adata.uns["technical_covariates"]["X_noise"]["per_batch"]
    assert len(per_batch) == 6


def test_max_cells_subsamples():
    adata = _screen()
    df = technical_covariates(adata, use_rep="X_noise", covariates=("batch",), max_cells=200)
    assert df["n_cells"].iloc[0] == 200


def test_errors():
    adata = _screen()
    adata.obs["one"] = "x"
    with pytest.raises(ValueError, match="1 class"):
        technical_covariates(adata, use_rep="X_noise", covariates=("one",))
    with pytest.raises(KeyError, match="Did not find the covariate"):
        technical_covariates(adata, use_rep="X_noise", covariates=("plate_row",))
    with pytest.raises(KeyError, match=r"Did not find \.obsm"):
        technical_covariates(adata, use_rep="X_mcvae", covariates=("batch",))
    with pytest.raises(ValueError, match="No control cells"):
        technical_covariates(adata, use_rep="X_noise", control_category="NTC")


def test_non_finite_embedding_names_rep_and_count():
    adata = _screen()
    controls = np.flatnonzero(adata.obs["gene_symbol"] == "nontargeting")
    treated = np.flatnonzero(adata.obs["gene_symbol"] != "nontargeting")
    adata.obsm["X_noise"][controls[:3], 0] = np.nan
    adata.obsm["X_noise"][controls[5], 2] = np.inf
    adata.obsm["X_noise"][treated[0], 1] = np.nan  # not used: controls only
    n = controls.size
    with pytest.raises(
        ValueError,
        match=rf"'X_noise' has NaN or infinite values in 4 of its {n} control cells \(e\.g\.",
    ):
        technical_covariates(adata, use_rep=["X_batchy", "X_noise"], covariates=("batch",))
    with pytest.raises(ValueError, match=r"in 5 of its 900 cells.*np\.isfinite"):
        technical_covariates(adata, use_rep="X_noise", covariates=("batch",), controls_only=False)


def test_reads_covariates_without_deriving_or_writing_obs():
    adata = _screen()
    adata.obs = adata.obs.drop(columns=["fov_position", "well_position"])
    adata.obs["plate"], adata.obs["well"], adata.obs["tile"] = "P1", "A1", 0
    adata.obs["cell_i"], adata.obs["cell_j"] = 100.0, 100.0
    before = adata.obs.copy()
    with pytest.raises(
        KeyError, match=r"\.obs\['fov_position'\].*Run `mcvi_ops\.pp\.derive_covariates\(adata\)`"
    ):
        technical_covariates(adata, use_rep="X_noise")
    pd.testing.assert_frame_equal(adata.obs, before)
    with pytest.raises(KeyError, match="Pass the obs columns to predict"):
        technical_covariates(adata, use_rep="X_noise", covariates=("plate_row",))
