"""read_scportrait on .h5sc files written to scPortrait 1.7's layout (scportrait.io.h5sc)."""

from __future__ import annotations

import tracemalloc
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest

from mcvi_ops.data import get_crops
from mcvi_ops.io import read_scportrait

# scPortrait's own uns keys contain "/", which anndata will stop writing in a future release
pytestmark = pytest.mark.filterwarnings("ignore:Forward slashes:FutureWarning")

IMAGES = "obsm/single_cell_images"
CHANNELS = ["DNA", "PH3", "cellbody"]


@pytest.fixture(scope="module")
def cells(eh_crops):
    """Real ExampleHuman nuclei: 40 px image crops scaled to [0, 1] and a nucleus mask."""
    crops, table = eh_crops
    images = crops[:60].astype(np.float32) / 255
    masks = (images[:, :1] > 0.2).astype(np.float32)
    ids = table["Metadata_ObjectNumber"].to_numpy()[:60]
    return masks, images, ids


def write_h5sc(path: Path, masks, images, ids, *, compression: str = "gzip", index=None) -> None:
    """What scportrait.io.numpy_to_h5sc writes: an AnnData h5ad plus the float16 image dataset.

    ``index`` replaces the obs names ("0", "1", ... as scPortrait writes them).
    """
    mask_names, n_cells, size = ["nucleus"], len(images), images.shape[2:]
    channels = np.array(mask_names + CHANNELS)
    mapping = ["mask"] * len(mask_names) + ["image_channel"] * len(CHANNELS)
    var = pd.DataFrame(index=np.arange(len(channels)).astype(str))
    var["channels"], var["channel_mapping"] = channels, mapping
    obs = pd.DataFrame({"scportrait_cell_id": ids.astype(np.uint64)})
    obs.index = obs.index.astype(str) if index is None else pd.Index(index)
    obs["condition"] = np.where(np.arange(n_cells) % 2, "stimulated", "unstimulated")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata: "obs_names not unique"
        adata = ad.AnnData(obs=obs, var=var)
    prefix = "single_cell_images"
    adata.uns[f"{prefix}/n_cells"] = n_cells
    adata.uns[f"{prefix}/n_masks"] = len(mask_names)
    adata.uns[f"{prefix}/channel_names"] = channels
    adata.uns[f"{prefix}/channel_mapping"] = np.array(mapping, dtype="<U15")
    adata.uns[f"{prefix}/compression"] = compression
    adata.write(path)
    data = np.concatenate([masks, images], axis=1).astype(np.float16)
    with h5py.File(path, "a") as handle:
        dataset = handle.create_dataset(
            IMAGES,
            shape=data.shape,
            chunks=(1, 1, *size),
            compression=compression,
            dtype=np.float16,
        )
        dataset.attrs["encoding-type"] = "array"
        dataset.attrs["encoding-version"] = "0.2.0"
        dataset.attrs["channel_names"] = np.array([c.encode() for c in channels])
        dataset.attrs["channel_mapping"] = np.array([m.encode() for m in mapping])
        dataset[...] = data


def test_h5sc_image_channels_copied_as_float32(cells, tmp_path):
    masks, images, ids = cells
    path = tmp_path / "single_cells.h5sc"
    write_h5sc(path, masks, images, ids)
    adata = read_scportrait(path, progress=False, chunk_cells=16)
    assert (tmp_path / "single_cells_crops" / "crops.zarr").is_dir()  # default out
    crops = get_crops(adata)
    assert crops.dtype == np.float32
    np.testing.assert_array_equal(crops, images.astype(np.float16).astype(np.float32))
    assert adata.uns["crops"]["channel_names"] == CHANNELS
    np.testing.assert_array_equal(adata.obs["scportrait_cell_id"], ids)
    assert list(adata.obs["condition"][:2]) == ["unstimulated", "stimulated"]
    info = adata.uns["import_crops"]
    assert info["source"] == "scportrait"
    assert list(info["file_channel_mapping"]) == ["mask"] + ["image_channel"] * 3

    both = read_scportrait(path, tmp_path / "all", channels="all", progress=False)
    np.testing.assert_array_equal(get_crops(both)[:, 0], masks[:, 0])
    picked = read_scportrait(path, tmp_path / "pick", channels=["PH3", "nucleus"], progress=False)
    np.testing.assert_array_equal(get_crops(picked)[:, 1], masks[:, 0])
    np.testing.assert_array_equal(get_crops(picked)[:, 0], crops[:, 1])


def test_h5ad_with_single_cell_images_in_obsm(cells, tmp_path):
    _, images, _ = cells
    path = tmp_path / "cells.h5ad"
    obs = pd.DataFrame({"gene": "A"}, index=[f"c{i}" for i in range(len(images))])
    ad.AnnData(obs=obs, obsm={"single_cell_images": images.astype(np.float16)}).write_h5ad(path)
    with pytest.raises(ValueError, match="stores no channel names.*channel_names= with 3 names"):
        read_scportrait(path, tmp_path / "a", progress=False)
    adata = read_scportrait(path, tmp_path / "b", channel_names=CHANNELS, progress=False)
    assert list(adata.obs_names[:2]) == ["c0", "c1"]
    np.testing.assert_allclose(get_crops(adata, [5]), images[[5]], atol=1e-3)


def test_copy_is_chunked(cells, tmp_path):
    """Memory stays flat: the peak does not grow with the number of cells."""
    masks, images, ids = cells
    peaks = {}
    for reps in (20, 80):  # 80: 4,800 cells, 92 MB of float32 image crops
        path = tmp_path / f"big{reps}.h5sc"
        tiled = [np.tile(a, (reps, 1, 1, 1)) for a in (masks, images)]
        write_h5sc(path, *tiled, np.arange(len(ids) * reps), compression="lzf")
        tracemalloc.start()
        adata = read_scportrait(path, tmp_path / f"out{reps}", progress=False)
        peaks[reps] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert adata.n_obs == len(ids) * reps
    assert peaks[80] < 1.3 * peaks[20], peaks
    assert peaks[80] < 0.5 * 4800 * 3 * 40 * 40 * 4, peaks
    np.testing.assert_array_equal(get_crops(adata, [4799]), get_crops(adata, [59]))


def test_duplicate_cell_ids_are_kept_unique_with_a_warning(cells, tmp_path):
    masks, images, ids = cells
    path = tmp_path / "dup.h5sc"
    names = ["a", "a", "b", *[f"c{i}" for i in range(7)]]
    write_h5sc(path, masks[:10], images[:10], ids[:10], index=names)
    with pytest.warns(UserWarning, match=r"1 duplicate cell ids, e.g. \['a'\]"):
        adata = read_scportrait(path, tmp_path / "out", progress=False)
    assert list(adata.obs_names[:3]) == ["a", "a-1", "b"]  # never replaced by positions
    np.testing.assert_array_equal(adata.obs["scportrait_cell_id"], ids[:10])
    on_disk = ad.read_h5ad(tmp_path / "out" / "cells.h5ad")
    assert list(on_disk.obs_names) == list(adata.obs_names)
    assert on_disk.uns["import_crops"]["source"] == "scportrait"


def test_bad_inputs(cells, tmp_path):
    masks, images, ids = cells
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_scportrait(tmp_path / "nope.h5sc", tmp_path / "a")
    (tmp_path / "text.h5sc").write_text("not hdf5")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        read_scportrait(tmp_path / "text.h5sc", tmp_path / "b")
    ad.AnnData(obs=pd.DataFrame(index=["a", "b"])).write_h5ad(tmp_path / "plain.h5ad")
    with pytest.raises(KeyError, match="no single-cell images at /obsm/single_cell_images"):
        read_scportrait(tmp_path / "plain.h5ad", tmp_path / "c")
    path = tmp_path / "x.h5sc"
    write_h5sc(path, masks[:4], images[:4], ids[:4])
    with pytest.raises(KeyError, match=r"\['GFP'\] are not in .*\['nucleus', 'DNA'"):
        read_scportrait(path, tmp_path / "d", channels=["GFP"])
    read_scportrait(path, tmp_path / "e", progress=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        read_scportrait(path, tmp_path / "e", progress=False)


def test_nonfinite_pixels_are_named_and_can_be_zeroed(cells, tmp_path):
    masks, images, ids = cells
    images = images.copy()
    images[3, 1, 5, 5] = np.nan
    images[4, 0, 0, 0] = np.inf
    path = tmp_path / "single_cells.h5sc"
    write_h5sc(path, masks, images, ids)
    with pytest.raises(ValueError, match="2 crops hold NaN.*'3', '4'.*nonfinite='zero'"):
        read_scportrait(path, tmp_path / "a", progress=False)
    adata = read_scportrait(path, tmp_path / "b", nonfinite="zero", progress=False)
    assert adata.uns["import_crops"]["n_nonfinite_values"] == 2
    assert np.isfinite(get_crops(adata)).all()
