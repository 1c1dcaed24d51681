from __future__ import annotations

import numpy as np
import pytest

import mcvi_ops
from mcvi_ops.pp._intensity import apply_intensity_factors, estimate_intensity_factors


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
    corrected = effects(apply_intensity_factors(crops, factors, dark))
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
