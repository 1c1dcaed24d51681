from __future__ import annotations

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given

import mcvi_ops
from mcvi_ops.pp._intensity import _percentile_of_counts, estimate_intensity_factors


def _corrected(crops: np.ndarray, factors: np.ndarray, dark: np.ndarray) -> np.ndarray:
    """Crops divided by their factors above the dark level by the model's own correction."""
    import torch

    from mcvi_ops.module import ImageVAE

    module = ImageVAE(crops.shape[1], crops.shape[2:], n_latent=2)
    module.dark_level.copy_(torch.as_tensor(dark, dtype=torch.float32).view(-1, 1, 1))
    with torch.no_grad():
        x = torch.as_tensor(crops.astype(np.float32))
        return module.correct_intensity(x, torch.as_tensor(factors)).numpy()


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    adata = mcvi_ops.datasets.synthetic_screen(
        n_cells=1500, n_genes=8, crop_size=32, seed=0, path=tmp_path_factory.mktemp("s") / "c.zarr"
    )
    mcvi_ops.pp.derive_covariates(adata)
    return adata


def test_factors_recover_gains_and_vignetting(screen):
    factors = estimate_intensity_factors(screen, batch_key="batch")
    assert factors.shape == (screen.n_obs, 4)
    assert screen.obsm["intensity_factors"] is factors
    info = screen.uns["intensity_factors"]
    assert len(info["dark_level"]) == 4 and info["batch_key"] == "batch"
    # per-well gains: the batch means of the factors follow the simulated channel gains
    gains = np.asarray(screen.uns["synthetic_screen"]["channel_gains"]).reshape(-1, 4)
    wells = screen.obs["batch"].astype(str)
    order = sorted(wells.unique())  # P1_A1, ... in the simulator's well order
    means = np.stack([factors[(wells == w).to_numpy()].mean(0) for w in order])
    for c in range(4):
        assert np.corrcoef(np.log(means[:, c]), np.log(gains[: len(order), c]))[0, 1] > 0.8
    # vignetting: cells at the field-of-view edge get smaller factors than central cells
    fov = screen.obs["fov_position"].astype(str).to_numpy()
    assert factors[fov == "edge"].mean() < 0.9 * factors[fov == "center"].mean()


def test_correction_removes_well_and_fov_from_intensities(screen):
    """Between-well and edge-vs-centre differences of log intensity shrink after correction."""
    factors = estimate_intensity_factors(screen, batch_key="batch")
    store = mcvi_ops.data.linked_store(screen)
    crops = store.take(screen.obs["crop_index"].to_numpy())
    dark = np.asarray(screen.uns["intensity_factors"]["dark_level"])
    wells = screen.obs["batch"].astype(str).to_numpy()
    fov = screen.obs["fov_position"].astype(str).to_numpy()

    def effects(x):
        signal = np.log(np.maximum((x - dark[None, :, None, None]).mean(axis=(2, 3)), 1))
        well_means = np.stack([signal[wells == w].mean(0) for w in np.unique(wells)])
        between_wells = well_means.std(0).mean()
        edge_gap = np.abs(signal[fov == "edge"].mean(0) - signal[fov == "center"].mean(0)).mean()
        return between_wells, edge_gap

    raw = effects(crops.astype(np.float32))
    corrected = effects(_corrected(crops, factors, dark))
    assert corrected[0] < 0.5 * raw[0]
    assert corrected[1] < 0.5 * raw[1]


def test_errors(screen):
    with pytest.raises(KeyError, match="cell_x"):
        estimate_intensity_factors(screen, i_key="cell_x")
    with pytest.raises(ValueError, match="at least 10 are needed"):
        estimate_intensity_factors(screen, control_category="nope")
    with pytest.raises(ValueError, match="non-negative integer"):
        estimate_intensity_factors(screen, degree=-1)
    broken = screen.copy()
    broken.obs["cell_i"] = broken.obs["cell_i"].astype(float)
    broken.obs.iloc[3, broken.obs.columns.get_loc("cell_i")] = np.nan
    with pytest.raises(ValueError, match="no finite tile position"):
        estimate_intensity_factors(broken)


@given(
    values=hnp.arrays(np.uint16, st.integers(1, 300), elements=st.integers(0, 70)),
    q=st.floats(0, 100),
)
def test_percentile_of_counts_equals_numpy(values, q):
    counts = np.bincount(values, minlength=2**16)
    assert _percentile_of_counts(counts, q) == pytest.approx(np.percentile(values, q), abs=1e-9)


def test_statistics_stream_in_blocks_and_match_for_float_crops(screen, tmp_path, monkeypatch):
    """Blocks of 100 crops give the statistics of all crops read at once, for uint16 and float32."""
    import mcvi_ops.pp._intensity as intensity

    store = mcvi_ops.data.linked_store(screen)
    rows = np.arange(0, screen.n_obs, 3)
    crops = store.take(rows)
    flat = crops.reshape(*crops.shape[:2], -1)
    as_float = mcvi_ops.io.crops_from_array(
        crops.astype(np.float32), tmp_path / "f.zarr", channel_names=store.channel_names
    )
    monkeypatch.setattr(intensity, "_READ_CELLS", 100)
    for source, index in (
        (store, rows),
        (mcvi_ops.data.linked_store(as_float), np.arange(len(rows))),
    ):
        means, background, dark = intensity._control_statistics(source, index, 0.5)
        np.testing.assert_allclose(means, flat.mean(-1), rtol=1e-12)
        np.testing.assert_allclose(background, np.percentile(flat, 1.0, axis=-1))
        expected = np.percentile(crops.transpose(1, 0, 2, 3).reshape(4, -1), 0.5, axis=1)
        np.testing.assert_allclose(dark, expected, rtol=1e-6)


# --- reliability v2: never factors of ~0 or inf ------------------------------------------------
def _controls_of(adata, batch):
    return np.flatnonzero(
        (adata.obs["gene_symbol"] == "nontargeting").to_numpy()
        & (adata.obs["batch"].astype(str) == batch).to_numpy()
    )


@pytest.mark.parametrize("keep", [0, 1])
def test_a_batch_with_too_few_controls_gets_the_average_gain(screen, caplog, keep):
    batch = sorted(screen.obs["batch"].astype(str).unique())[0]
    controls = _controls_of(screen, batch)
    adata = screen[np.setdiff1d(np.arange(screen.n_obs), controls[keep:])].copy()
    with caplog.at_level("WARNING", logger="mcvi_ops"):
        factors = estimate_intensity_factors(adata, batch_key="batch")
    assert f"'{batch}': {keep}" in caplog.text and "average gain" in caplog.text
    in_batch = (adata.obs["batch"].astype(str) == batch).to_numpy()
    others = factors[~in_batch].mean(axis=0)
    # the batch is on the average gain (with its own positions), never near 0 or inf
    np.testing.assert_allclose(factors[in_batch].mean(axis=0), others, rtol=0.25)
    assert np.isfinite(factors).all() and factors.min() > 0.1 and factors.max() < 10


def test_positions_outside_the_tile_and_bad_options_are_refused(screen):
    adata = screen.copy()
    tile = adata.uns["synthetic_screen"]["tile_size"]
    adata.obs["cell_i"] = adata.obs["cell_i"] * 3  # positions in another unit, e.g. 3x
    with pytest.raises(ValueError, match=r"cells lie outside the tile \[0, .*Pass `tile_size=`"):
        estimate_intensity_factors(adata, batch_key="batch")
    with pytest.raises(ValueError, match="outside the tile"):
        estimate_intensity_factors(screen, tile_size=tile / 4)
    for option, value in (("max_cells", 0), ("tile_size", 0), ("min_batch_controls", 0)):
        with pytest.raises(ValueError, match=f"`{option}` must be"):
            estimate_intensity_factors(screen, **{option: value})


def test_nan_batch_labels_are_refused(screen):
    adata = screen.copy()
    batch = adata.obs["batch"].astype(object)
    batch.iloc[:4] = np.nan
    adata.obs["batch"] = batch
    with pytest.raises(ValueError, match=r"4 cells have no batch.*'nan'.*batch_key=None"):
        estimate_intensity_factors(adata, batch_key="batch")


def test_cells_beyond_the_fitted_controls_get_the_edge_factor(screen, caplog):
    adata = screen.copy()
    controls = (adata.obs["gene_symbol"] == "nontargeting").to_numpy()
    corner = ~controls & (adata.obs["cell_i"] > 0).to_numpy()
    # controls only in the top half of the tile; perturbed cells at the bottom edge
    tile = adata.uns["synthetic_screen"]["tile_size"]
    adata.obs.loc[controls, "cell_i"] = adata.obs.loc[controls, "cell_i"] % (tile / 2)
    adata.obs.loc[corner, "cell_i"] = tile - 1
    with caplog.at_level("WARNING", logger="mcvi_ops"):
        factors = estimate_intensity_factors(adata)
    assert "beyond the positions of the fitted control cells" in caplog.text
    assert np.isfinite(factors).all() and 0.1 < factors.min() and factors.max() < 10
