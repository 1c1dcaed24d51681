from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi
from skimage.measure import regionprops

from mcvi_ops.data import link_crops, write_crops
from mcvi_ops.datasets import synthetic_screen
from mcvi_ops.io import crops_from_array
from mcvi_ops.tl import cellprofiler_features
from mcvi_ops.tl._cellprofiler import FAMILIES, _mosaic

SIZE = 48


@pytest.fixture(scope="module")
def stardist(paths, tmp_path_factory):
    """48 px crops (image, label mask) around real StarDist nuclei that fit in their crop."""
    image = tifffile.imread(paths["stardist"] / "img2d.tif")
    mask = tifffile.imread(paths["stardist"] / "mask2d.tif")
    half = SIZE // 2
    props = [
        p
        for p in regionprops(mask, intensity_image=image)
        if min(p.bbox[:2]) >= half + 2 and max(p.bbox[2:]) <= 512 - half - 2
    ][:30]
    centres = [np.floor(np.asarray(p.centroid) + 0.5).astype(int) for p in props]
    stack = np.stack([image, mask.astype(np.uint16)])
    crops = np.stack([stack[:, y - half : y + half, x - half : x + half] for y, x in centres])
    obs = pd.DataFrame(
        {
            "area": [p.area for p in props],
            "perimeter": [p.perimeter for p in props],
            "mean_intensity": [p.intensity_mean for p in props],
        },
        index=[f"nucleus{p.label}" for p in props],
    )
    out = tmp_path_factory.mktemp("stardist")
    return crops_from_array(crops, out, channel_names=["DNA", "mask"], obs=obs), crops


@pytest.fixture(scope="module")
def examplehuman(eh, tmp_path_factory):
    """48 px crops of the ExampleHuman field (DNA, PH3, cellbody) around its nuclei."""
    image, cells = eh
    half = SIZE // 2
    padded = np.pad(image, ((0, 0), (half, half), (half, half)))
    rows = np.floor(cells["Nuclei_Location_Center_Y"].to_numpy() + 0.5).astype(int)
    cols = np.floor(cells["Nuclei_Location_Center_X"].to_numpy() + 0.5).astype(int)
    crops = np.stack(
        [padded[:, r : r + SIZE, c : c + SIZE] for r, c in zip(rows, cols, strict=True)]
    )
    # PH3 (mitotic marker) at the nucleus centre, read straight from the field
    window = np.array(
        [image[1, r - 2 : r + 3, c - 2 : c + 3].mean() for r, c in zip(rows, cols, strict=True)]
    )
    obs = pd.DataFrame({"ph3_centre": window}, index=cells["Metadata_ObjectID"].astype(str))
    out = tmp_path_factory.mktemp("examplehuman")
    return crops_from_array(crops, out, channel_names=["DNA", "PH3", "cellbody"], obs=obs)


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    path = tmp_path_factory.mktemp("screen") / "crops.zarr"
    adata = synthetic_screen(
        n_cells=12, n_genes=2, guides_per_gene=1, n_control_guides=1, crop_size=40, path=path,
        chunk_cells=5, seed=0,
    )  # fmt: skip
    return adata


def test_nucleus_shape_and_intensity_from_a_mask_channel_match_regionprops(stardist):
    adata, _ = stardist
    features = cellprofiler_features(
        adata, families=("sizeshape", "intensity"), masks="mask", n_jobs=1, progress=False
    )
    assert list(features.uns["cellprofiler_features"]["params"]["channels"]) == ["DNA"]
    np.testing.assert_array_equal(
        features[:, "Nuclei_AreaShape_Area"].X.ravel(), adata.obs["area"].to_numpy()
    )
    np.testing.assert_allclose(
        features[:, "Nuclei_AreaShape_Perimeter"].X.ravel(), adata.obs["perimeter"], rtol=1e-5
    )
    scale = features.uns["cellprofiler_features"]["intensity_scale"][0]
    np.testing.assert_allclose(
        features[:, "Nuclei_Intensity_MeanIntensity_DNA"].X.ravel() * scale,
        adata.obs["mean_intensity"],
        rtol=1e-5,
    )
    # with one nuclear stain and no cell mask, the cell is the nucleus
    np.testing.assert_array_equal(
        features[:, "Cells_AreaShape_Area"].X, features[:, "Nuclei_AreaShape_Area"].X
    )


def test_masks_from_a_label_store_and_dtype_scale(stardist, tmp_path):
    adata, crops = stardist
    labels = write_crops(
        tmp_path / "labels.zarr",
        np.repeat(crops[:, 1:], 2, axis=1),
        channel_names=["nuclei", "cells"],
    )
    image_only = adata.copy()
    link_crops(
        image_only, write_crops(tmp_path / "image.zarr", crops[:, :1], channel_names=["DNA"])
    )
    features = cellprofiler_features(
        image_only,
        families="intensity",
        masks={"nuclei": "nuclei", "cells": "cells"},
        label_store=labels,
        intensity_scale="dtype",
        n_jobs=1,
        progress=False,
    )
    np.testing.assert_allclose(
        features[:, "Cells_Intensity_MeanIntensity_DNA"].X.ravel() * 65535,
        adata.obs["mean_intensity"],
        rtol=1e-5,
    )
    few = write_crops(tmp_path / "few.zarr", crops[:3, 1:], channel_names=["nuclei"])
    with pytest.raises(ValueError, match="must match the crops row for row"):
        cellprofiler_features(image_only, masks="nuclei", label_store=few)


def test_segmented_nuclei_match_stardist_masks(stardist):
    adata, _ = stardist
    features = cellprofiler_features(
        adata, families="sizeshape", channels=["DNA"], n_jobs=1, progress=False
    )
    area = features[:, "Nuclei_AreaShape_Area"].X.ravel()
    relative_error = np.abs(area - adata.obs["area"].to_numpy()) / adata.obs["area"].to_numpy()
    assert np.mean(relative_error < 0.25) >= 0.6
    assert np.median(relative_error) < 0.2


def test_mitotic_cells_have_higher_ph3_intensity(examplehuman):
    adata = examplehuman
    high = adata.obs["ph3_centre"] > 5 * adata.obs["ph3_centre"].median()
    assert 5 <= high.sum() <= 30
    rng = np.random.default_rng(0)
    rows = np.r_[np.flatnonzero(high), rng.choice(np.flatnonzero(~high), 40, replace=False)]
    subset = adata[rows].copy()
    features = cellprofiler_features(subset, families="intensity", n_jobs=1, progress=False)
    assert features.obs_names.equals(subset.obs_names)
    assert features.obs.equals(subset.obs)
    ph3 = features[:, "Nuclei_Intensity_MeanIntensity_PH3"].X.ravel()
    is_high = subset.obs["ph3_centre"].to_numpy() > 5 * adata.obs["ph3_centre"].median()
    assert np.nanmin(ph3[is_high]) > np.nanpercentile(ph3[~is_high], 90)
    assert np.nanmean(ph3[is_high]) > 3 * np.nanmean(ph3[~is_high])
    # the DNA stain is not what sets them apart
    dna = features[:, "Nuclei_Intensity_MeanIntensity_DNA"].X.ravel()
    assert np.nanmean(dna[is_high]) < 3 * np.nanmean(dna[~is_high])


def test_families_names_and_var_table(examplehuman):
    subset = examplehuman[:4].copy()
    features = cellprofiler_features(
        subset, families=("intensity", "colocalization"), n_jobs=1, progress=False
    )
    assert set(features.var["family"]) == {"intensity", "colocalization"}
    assert list(features.var.columns) == ["object", "channel", "family", "measurement"]
    row = features.var.loc["Nuclei_Intensity_MeanIntensity_DNA"]
    assert tuple(row) == ("Nuclei", "DNA", "intensity", "MeanIntensity")
    row = features.var.loc["Cells_Correlation_Correlation_DNA_PH3"]
    assert tuple(row) == ("Cells", "DNA:PH3", "colocalization", "Correlation")
    assert "Cells_Correlation_Manders_cellbody_PH3" in features.var_names
    assert not features.var_names.str.contains("Location|Center_").any()
    assert features.uns["crops"] == subset.uns["crops"]
    assert features.X.dtype == np.float32
    shape = cellprofiler_features(subset, families="sizeshape", n_jobs=1, progress=False)
    assert set(shape.var["channel"]) == {""}
    assert "Nuclei_AreaShape_Zernike_2_0" in shape.var_names
    assert not features.var_names.str.contains("Costes").any()
    costes = cellprofiler_features(
        subset, families="colocalization", costes=True, n_jobs=1, progress=False
    )
    assert {"Cells_Correlation_Costes_DNA_PH3", "Cells_Correlation_Costes_PH3_DNA"} <= set(
        costes.var_names
    )
    with pytest.raises(ValueError, match="Unknown measurement families \\['shape'\\]"):
        cellprofiler_features(subset, families=("intensity", "shape"))


def test_empty_crops_give_nan_and_a_warning(examplehuman, tmp_path, caplog):
    from mcvi_ops.data import get_crops

    crops = get_crops(examplehuman, slice(0, 4))
    crops[[1, 3]] = 0
    adata = crops_from_array(crops, tmp_path, channel_names=["DNA", "PH3", "cellbody"])
    with caplog.at_level(logging.WARNING):
        features = cellprofiler_features(adata, families="intensity", n_jobs=1, progress=False)
    assert "2 of 4 crops have no nucleus" in caplog.text
    assert features.uns["cellprofiler_features"]["n_missing"] == {"nuclei": 2, "cells": 2}
    assert np.isnan(features.X[[1, 3]]).all()
    assert np.isfinite(features.X[[0, 2]]).all()


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_parallel_equals_serial_and_cells_do_not_depend_on_their_batch(screen):
    serial = cellprofiler_features(screen, n_jobs=1, batch_cells=3, progress=False)
    assert set(serial.var["family"]) == set(FAMILIES) - {"granularity"}
    assert serial.n_vars > 1000
    assert np.isfinite(serial.X).mean() > 0.9
    parallel = cellprofiler_features(screen, n_jobs=2, batch_cells=3, progress=False)
    np.testing.assert_array_equal(parallel.X, serial.X)

    order = [7, 3, 11, 3, 0, 5, 9, 1, 2, 4, 6, 8, 10]  # a crop twice, across store chunks
    shuffled = screen[order].copy()
    shuffled.obs_names_make_unique()
    other = cellprofiler_features(shuffled, n_jobs=2, batch_cells=2, progress=False)
    assert other.obs_names.equals(shuffled.obs_names)
    zernike = serial.var_names.str.contains("Zernike")
    np.testing.assert_array_equal(other.X[:, ~zernike], serial.X[order][:, ~zernike])
    # CellProfiler's enclosing circle handles the objects of a call together
    same = np.isclose(other.X[:, zernike], serial.X[order][:, zernike], equal_nan=True)
    assert same.all(axis=1).mean() >= 0.75


def test_granularity_spectrum(screen):
    features = cellprofiler_features(
        screen[:3].copy(), families="granularity", channels=["DAPI"], n_jobs=1, progress=False
    )
    assert list(features.var_names[:2]) == [
        "Nuclei_Granularity_1_DAPI",
        "Nuclei_Granularity_2_DAPI",
    ]
    assert features.shape == (3, 2 * 16)
    assert np.isfinite(features.X).all()
    # the spectrum is the percentage of each object's intensity removed at each step
    spectra = features.X.reshape(3, 2, 16)
    assert (spectra >= -1e-4).all()
    assert (spectra.sum(axis=2) <= 100 + 1e-3).all()
    assert (spectra[:, :, 0] > 1).all()


def test_option_errors(screen, examplehuman):
    with pytest.raises(ValueError, match="measurable channels are \\['DNA', 'PH3', 'cellbody'\\]"):
        cellprofiler_features(examplehuman, channels=["DNA", "GFP"])
    with pytest.raises(KeyError, match="Mask channel 'labels' .* not a channel of the crop store"):
        cellprofiler_features(examplehuman, masks="labels")
    with pytest.raises(ValueError, match="needs the key 'nuclei'"):
        cellprofiler_features(examplehuman, masks={"cells": "cellbody"})
    with pytest.raises(ValueError, match="nucleus_channel 'DAPI'"):
        cellprofiler_features(examplehuman, nucleus_channel="DAPI")
    with pytest.raises(ValueError, match="one positive number or one per measured channel \\(3\\)"):
        cellprofiler_features(examplehuman, intensity_scale=[1.0, 2.0])
    with pytest.raises(ValueError, match="batch_cells must be a positive"):
        cellprofiler_features(examplehuman, batch_cells=0)
    with pytest.raises(ValueError, match="n_jobs must be a positive"):
        cellprofiler_features(examplehuman, n_jobs=0)
    unlinked = examplehuman.copy()
    del unlinked.uns["crops"]
    with pytest.raises(KeyError, match="not linked to crops"):
        cellprofiler_features(unlinked)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12), st.booleans()), max_size=9))
def test_mosaic_keeps_every_object_apart_and_whole(shapes):
    rng = np.random.default_rng(len(shapes))
    masks = np.zeros((len(shapes), 14, 14), dtype=bool)
    for mask, (height, width, empty) in zip(masks, shapes, strict=True):
        if not empty:
            mask[1 : 1 + height, 2 : 2 + width] = rng.random((height, width)) < 0.7
            mask[1, 2] = True
    pixels = rng.random((len(shapes), 2, 14, 14))
    rows, labels, mosaic = _mosaic(masks, pixels)
    np.testing.assert_array_equal(rows, np.flatnonzero(masks.any(axis=(1, 2))))
    for k, row in enumerate(rows):
        # objects never touch (8-connectivity), so per-object measurements cannot mix them
        around = ndi.binary_dilation(labels == k + 1, structure=np.ones((3, 3)))
        assert set(np.unique(labels[around])) <= {0, k + 1}
        box = ndi.find_objects((labels == k + 1).astype(int))[0]
        own = ndi.find_objects(masks[row].astype(int))[0]
        np.testing.assert_array_equal(labels[box] == k + 1, masks[row][own])
        np.testing.assert_array_equal(mosaic[(slice(None), *box)], pixels[row][(slice(None), *own)])
