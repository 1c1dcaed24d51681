"""tl.normalize_to_controls and tl.cellprofiler_features never convert values silently."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile
from skimage.measure import regionprops

from mcvi_ops.io import crops_from_array
from mcvi_ops.tl import cellprofiler_features, normalize_to_controls


def _features(n=120, seed=0):
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(
        {
            "well": np.repeat(["A1", "A2"], n // 2),
            "gene_symbol": np.tile(["nontargeting", "G1", "G2"], n // 3),
        },
        index=[f"c{i}" for i in range(n)],
    )
    return ad.AnnData(rng.normal(size=(n, 3)), obs=obs)


def test_huge_features_keep_their_spread(caplog):
    adata = _features()
    expected = normalize_to_controls(adata.copy(), batch_key="well")
    adata.X[:, 1] *= 1e200  # e.g. a moment of a huge object; its variance overflows float64
    with caplog.at_level(logging.WARNING, logger="mcvi_ops"):
        out = normalize_to_controls(adata, batch_key="well")
    assert "no spread" not in caplog.text
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_values_beyond_float32_are_refused_not_stored_as_inf():
    adata = _features()
    adata.X[4, 0] = 1e300  # a perturbed cell (row 4 is 'G1') far outside the controls
    with pytest.raises(ValueError, match=r"exceed the float32 range.*\['c4'\]"):
        normalize_to_controls(adata, batch_key="well")


def test_nan_batch_labels_are_refused():
    adata = _features()
    wells = adata.obs["well"].astype(object)
    wells.iloc[[3, 9]] = np.nan
    adata.obs["well"] = wells
    with pytest.raises(ValueError, match=r"2 cells have no batch.*'nan'.*batch_key=None"):
        normalize_to_controls(adata, batch_key="well")


@pytest.fixture(scope="module")
def nuclei(paths, tmp_path_factory):
    """32 px crops of real StarDist nuclei: the image as float32 [0, 1] and the label mask."""
    image = tifffile.imread(paths["stardist"] / "img2d.tif").astype(np.float32)
    mask = tifffile.imread(paths["stardist"] / "mask2d.tif")
    props = [p for p in regionprops(mask) if min(p.bbox[:2]) >= 18 and max(p.bbox[2:]) <= 494]
    centres = [np.floor(np.asarray(p.centroid) + 0.5).astype(int) for p in props[:20]]
    stack = np.stack([image / image.max(), mask.astype(np.float32)])
    crops = np.stack([stack[:, y - 16 : y + 16, x - 16 : x + 16] for y, x in centres])
    out = tmp_path_factory.mktemp("nuclei")
    return crops_from_array(crops, out, channel_names=["DNA", "labels"], progress=False)


def test_a_float_intensity_channel_is_not_taken_as_masks(nuclei):
    with pytest.raises(ValueError, match=r"'DNA' \(nuclei\) holds fractional.*not object labels"):
        cellprofiler_features(nuclei, masks="DNA", families="sizeshape", progress=False)
    # whole-number float labels are labels: they measure
    features = cellprofiler_features(
        nuclei, masks="labels", families="sizeshape", n_jobs=1, progress=False
    )
    assert np.isfinite(features.X).any()


def test_features_beyond_float32_are_reported(nuclei, caplog):
    with caplog.at_level(logging.WARNING, logger="mcvi_ops"):
        features = cellprofiler_features(
            nuclei,
            masks="labels",
            families="intensity",
            intensity_scale=1e-40,  # pixels of 1e40: integrated intensities overflow float32
            n_jobs=1,
            progress=False,
        )
    assert "exceed the float32 range" in caplog.text and "stored as infinite" in caplog.text
    assert np.isinf(features.X).any()
