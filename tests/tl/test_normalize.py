from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcvi_ops.tl import normalize_to_controls


def _cells(n=240, d=4, seed=0, mixing=None, extra=0):
    """Two wells of the same cells; the second sees them through another linear map and offset."""
    rng = np.random.default_rng(seed)
    genes = np.tile(["nontargeting", "nontargeting", "G1"], n // 6)
    obs = pd.DataFrame(
        {"well": np.repeat(["A1", "A2"], n // 2), "gene_symbol": np.r_[genes, genes]},
        index=[f"c{i}" for i in range(n)],
    )
    first = rng.normal(size=(n // 2, d)) @ np.diag(np.arange(1, d + 1))
    first[genes == "G1", 0] += 3.0  # the perturbation's effect
    mixing = np.eye(d) * 2 if mixing is None else mixing
    x = np.r_[first, first @ mixing + 10.0]
    x = np.c_[x, rng.normal(size=(n, extra))]
    names = [f"f{j}" for j in range(d + extra)]
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=names))


def test_center_scale_by_hand():
    adata = _cells()
    out = normalize_to_controls(adata, batch_key="well")
    assert adata.obsm["X_center_scale"] is out
    expected = adata.X.copy()
    for well in ("A1", "A2"):
        rows = (adata.obs["well"] == well).to_numpy()
        controls = expected[rows & (adata.obs["gene_symbol"] == "nontargeting").to_numpy()]
        expected[rows] = (expected[rows] - controls.mean(0)) / controls.std(0, ddof=1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert list(adata.uns["X_center_scale"]["features"]) == ["f0", "f1", "f2", "f3"]
    assert adata.uns["X_center_scale"]["params"]["method"] == "center_scale"


def test_dropped_features_and_missing_values_are_reported(caplog):
    adata = _cells()
    adata.X[:, 2] = 1.0  # no spread anywhere
    adata.X[5, 1] = np.nan  # one undefined measurement
    with caplog.at_level(logging.WARNING):
        out = normalize_to_controls(adata, batch_key="well", key_added="normed")
    assert "Dropping 1 of 4 features with no spread" in caplog.text
    assert "Setting 1 non-finite values to 0" in caplog.text
    assert out.shape == (240, 3)
    assert list(adata.uns["normed"]["features"]) == ["f0", "f1", "f3"]
    assert out[5, 1] == 0.0


def test_embedding_in_obsm():
    adata = _cells()
    adata.obsm["X_mcvae"] = adata.X[:, ::-1].copy()
    adata.obsm["X_mcvae"][:, 0] = 0.0
    out = normalize_to_controls(adata, batch_key=None, use_rep="X_mcvae")
    assert out.shape == (240, 3)
    np.testing.assert_array_equal(adata.uns["X_mcvae_center_scale"]["features"], [1, 2, 3])
    controls = out[(adata.obs["gene_symbol"] == "nontargeting").to_numpy()]
    np.testing.assert_allclose(controls.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(controls.std(0, ddof=1), 1, rtol=1e-5)


def test_tvn_whitens_the_controls_of_every_batch():
    mixing = np.array([[1.0, 0.8, 0, 0], [0, 1.0, 0, 0], [0, 0.5, 2.0, 0], [0.3, 0, 0, 0.5]])
    adata = _cells(n=600, mixing=mixing)
    out = normalize_to_controls(adata, batch_key="well", method="tvn", shrinkage=0.0)
    is_control = (adata.obs["gene_symbol"] == "nontargeting").to_numpy()
    shifts = []
    for well in ("A1", "A2"):
        rows = (adata.obs["well"] == well).to_numpy()
        controls = out[rows & is_control]
        np.testing.assert_allclose(controls.mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(np.cov(controls, rowvar=False), np.eye(4), atol=1e-5)
        shifts.append(np.linalg.norm(out[rows & ~is_control].mean(0)))
    # the perturbation is as far from the controls (in control units) in both wells, which
    # per-feature scaling cannot achieve when the wells mix features differently
    assert shifts[0] == pytest.approx(shifts[1], rel=1e-6)
    scaled = normalize_to_controls(adata, batch_key="well")
    scaled_shifts = [
        np.linalg.norm(scaled[(adata.obs["well"] == w).to_numpy() & ~is_control].mean(0))
        for w in ("A1", "A2")
    ]
    assert abs(scaled_shifts[0] - scaled_shifts[1]) > 0.05 * scaled_shifts[0]
    # EFAAR's shrinkage whitens each batch part of the way from the pooled whitening
    rows = (adata.obs["well"] == "A2").to_numpy() & is_control

    def spread(shrinkage):
        out = normalize_to_controls(adata, batch_key="well", method="tvn", shrinkage=shrinkage)
        return np.ptp(np.log(np.linalg.eigvalsh(np.cov(out[rows], rowvar=False))))

    assert spread(0.0) < 1e-4 < spread(0.5) < 0.75 * spread(1e9)


def test_tvn_centres_batches_with_few_controls(caplog):
    adata = _cells(n=30, extra=8)
    with caplog.at_level(logging.INFO):
        out = normalize_to_controls(adata, batch_key="well", method="tvn")
    assert "without whitening" in caplog.text
    is_control = (adata.obs["gene_symbol"] == "nontargeting").to_numpy()
    # 20 controls in all span at most 19 axes
    assert out.shape == (30, 12)
    everything = out[is_control]
    for well in ("A1", "A2"):
        rows = (adata.obs["well"] == well).to_numpy() & is_control
        np.testing.assert_allclose(out[rows].mean(0), 0, atol=1e-6)
    assert np.isfinite(everything).all()


def test_errors():
    adata = _cells()
    with pytest.raises(ValueError, match="method must be 'center_scale' or 'tvn', got 'zca'"):
        normalize_to_controls(adata, batch_key="well", method="zca")
    with pytest.raises(ValueError, match="shrinkage must be a non-negative"):
        normalize_to_controls(adata, batch_key="well", method="tvn", shrinkage=-1)
    with pytest.raises(KeyError, match="Did not find .obsm\\['X_pca'\\]"):
        normalize_to_controls(adata, batch_key="well", use_rep="X_pca")
    adata.obs.loc[adata.obs_names[120:], "gene_symbol"] = "G1"
    adata.obs.loc[adata.obs_names[120], "gene_symbol"] = "nontargeting"
    with pytest.raises(ValueError, match="Batch 'A2' of .obs\\['well'\\] has 1 control cells"):
        normalize_to_controls(adata, batch_key="well")


@settings(max_examples=30, deadline=None)
@given(
    scale=st.lists(st.floats(0.1, 10), min_size=3, max_size=3),
    offset=st.lists(st.floats(-100, 100), min_size=3, max_size=3),
)
def test_center_scale_ignores_per_batch_units(scale, offset):
    adata = _cells(d=3, mixing=np.eye(3))
    before = normalize_to_controls(adata, batch_key="well").copy()
    rows = (adata.obs["well"] == "A2").to_numpy()
    adata.X[rows] = adata.X[rows] * np.asarray(scale) + np.asarray(offset)
    after = normalize_to_controls(adata, batch_key="well")
    np.testing.assert_allclose(after, before, atol=1e-3)
