"""read_brieflow on a small brieflow output folder made to brieflow 1.4.14's layout."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

from mcvi_ops.data import get_crops
from mcvi_ops.io import MissingTileError, read_brieflow
from mcvi_ops.io._brieflow import read_ome_zarr

CHANNELS = ["DNA", "PH3", "cellbody"]
N_TILES = 2


def brieflow_table(table: pd.DataFrame) -> pd.DataFrame:
    """The fixture's Funk-style table with the columns of brieflow's merge_final parquet."""
    n = len(table)
    k = np.arange(n)
    gene = np.where(k % 3 == 0, "nontargeting", np.where(k % 3 == 1, "POLR2A", "RPL17"))
    out = pd.DataFrame(
        {
            "plate": 1,
            "well": table["well"].to_numpy(),
            "tile": table["tile"].to_numpy(),
            "cell_0": table["cell"].to_numpy(),
            "i_0": table["cell_i"].to_numpy(),
            "j_0": table["cell_j"].to_numpy(),
            "cell_barcode_0": [f"{g}_{i % 2}" for g, i in zip(gene, k, strict=True)],
            "gene_symbol_0": gene,
            "mapped_single_gene": k % 10 != 5,
            "cell_i": table["cell_i"].to_numpy(),
            "cell_j": table["cell_j"].to_numpy(),
            "cell_bounds_0": np.floor(table["cell_i"].to_numpy()) - 9,
            "cell_bounds_1": np.floor(table["cell_j"].to_numpy()) - 11,
            "cell_bounds_2": np.floor(table["cell_i"].to_numpy()) + 9,
            "cell_bounds_3": np.floor(table["cell_j"].to_numpy()) + 11,
            "cell_area": (k % 50 + 100).astype(float),
            "nucleus_DNA_mean": k * 0.5,
        }
    )
    return out[out["tile"] < N_TILES].reset_index(drop=True)


def write_ome_zarr(path: Path, image: np.ndarray, *, version: str = "0.5") -> None:
    """One tile as brieflow's zarr3 layout writes it: TCZYX level 0 under multiscales."""
    axes = [
        {"name": "t", "type": "time"},
        {"name": "c", "type": "channel"},
        {"name": "z", "type": "space"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    meta = {
        "multiscales": [
            {
                "axes": axes,
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [{"type": "scale", "scale": [1] * 5}],
                    }
                ],
            }
        ],
        "omero": {"channels": [{"label": c, "color": "FFFFFF"} for c in CHANNELS]},
    }
    fmt = 3 if version == "0.5" else 2
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    group.attrs.update({"ome": {"version": version, **meta}} if fmt == 3 else meta)
    data = image[None, :, None]
    array = group.create_array("0", shape=data.shape, dtype=data.dtype, chunks=(1, 1, 1, 256, 256))
    array[...] = data


@pytest.fixture
def brieflow(tiles, tmp_path):
    """A brieflow output folder with TIFF tiles, one with OME-Zarr tiles, and the cell table."""
    _, table, images = tiles
    cells = brieflow_table(table)
    tiff_root, zarr_root = tmp_path / "bf_tiff", tmp_path / "bf_zarr"
    parquets = tiff_root / "merge" / "parquets"
    parquets.mkdir(parents=True)
    cells.to_parquet(parquets / "P-1_W-A1__merge_final.parquet")
    (tiff_root / "phenotype" / "images").mkdir(parents=True)
    for tile in range(N_TILES):
        name = f"P-1_W-A1_T-{tile}__aligned.tiff"
        tifffile.imwrite(
            tiff_root / "phenotype" / "images" / name, images[tile], photometric="minisblack"
        )
        write_ome_zarr(
            zarr_root / "phenotype" / "aligned_1.zarr" / "A" / "1" / str(tile), images[tile]
        )
    return tiff_root, zarr_root, cells, images


def test_tiff_and_ome_zarr_tiles_give_the_same_crops(brieflow, tmp_path):
    tiff_root, zarr_root, cells, images = brieflow
    common = {"crop_size": 40, "clip_percentiles": None, "progress": False}
    a = read_brieflow(tiff_root, tiff_root, tmp_path / "a", channel_names=CHANNELS, **common)
    b = read_brieflow(tiff_root / "merge" / "parquets", zarr_root, tmp_path / "b", **common)
    np.testing.assert_array_equal(get_crops(a), get_crops(b))
    assert b.uns["crops"]["channel_names"] == CHANNELS  # read from the OME-Zarr omero labels
    assert a.uns["brieflow"]["image_format"] == "tiff"
    assert b.uns["brieflow"]["image_format"] == "ome-zarr"

    # single-gene filter, uid index, package columns
    kept = cells[cells["mapped_single_gene"]]
    assert a.uns["brieflow"]["n_dropped_not_single_gene"] == int(
        (~cells["mapped_single_gene"]).sum()
    )
    assert set(a.obs_names) <= {
        f"1_A1_{t}_{c}" for t, c in zip(kept["tile"], kept["cell_0"], strict=True)
    }
    assert a.uns["extract_crops"]["n_cells_in"] == len(kept)
    assert set(a.obs["gene_symbol"]) == {"nontargeting", "POLR2A", "RPL17"}
    np.testing.assert_array_equal(a.obs["is_control"], a.obs["gene_symbol"] == "nontargeting")
    np.testing.assert_array_equal(a.obs["sgRNA"], a.obs["cell_barcode_0"])
    assert "cell_area" not in a.obs  # features are not metadata
    assert a.uns["brieflow"]["guide_key"] == "cell_barcode_0"

    # a crop is the tile window around the cell's rounded centroid
    row = a.obs.iloc[7]
    r, c = int(np.floor(row["cell_i"] + 0.5)), int(np.floor(row["cell_j"] + 0.5))
    tile = images[int(row["tile"])]
    np.testing.assert_array_equal(get_crops(a, [7])[0], tile[:, r - 20 : r + 20, c - 20 : c + 20])

    on_disk = ad.read_h5ad(tmp_path / "a" / "cells.h5ad")
    assert on_disk.uns["brieflow"]["brieflow_version_followed"] == "1.4.14"


def test_singlecell_h5ad_with_features_and_auto_crop_size(brieflow, tmp_path):
    tiff_root, _, cells, _ = brieflow
    # brieflow's single-cell AnnData: metadata in obs (cell_0 renamed), features in X
    meta = cells.drop(columns=["cell_area", "nucleus_DNA_mean"]).rename(
        columns={"cell_0": "cell_phenotype", "i_0": "i_phenotype", "j_0": "j_phenotype"}
    )
    meta.index = [f"cell{i}" for i in range(len(meta))]
    x = cells[["cell_area", "nucleus_DNA_mean"]].to_numpy(np.float32)
    singlecell = ad.AnnData(
        X=x, obs=meta, var=pd.DataFrame(index=["cell_area", "nucleus_DNA_mean"])
    )
    path = tmp_path / "CeCl-all_ChCo-DNA_PH3__singlecell.h5ad"
    singlecell.write_h5ad(path)

    adata = read_brieflow(
        path,
        tiff_root / "phenotype" / "images",
        tmp_path / "out",
        channel_names=CHANNELS,
        crop_size="auto",
        features=True,
        progress=False,
    )
    assert adata.uns["brieflow"]["crop_size"] == 22  # bounding boxes are 18 x 22 px
    assert adata.uns["extract_crops"]["crop_size"] == 22
    assert adata.uns["brieflow"]["fraction_larger_than_crop"] == 0.0
    assert list(adata.var_names) == ["cell_area", "nucleus_DNA_mean"]
    expected = cells.set_index(
        "1_A1_" + cells["tile"].astype(str) + "_" + cells["cell_0"].astype(str)
    ).loc[adata.obs_names, ["cell_area", "nucleus_DNA_mean"]]
    np.testing.assert_allclose(adata.X, expected.to_numpy())
    assert ad.read_h5ad(tmp_path / "out" / "cells.h5ad").n_vars == 2


def test_duplicate_cell_ids_are_kept_unique_with_a_warning(brieflow, tmp_path):
    tiff_root, _, cells, _ = brieflow
    # two rows of one tile, far from its edges, share a cell id; text columns as in pandas 3
    inside = cells[cells[["cell_i", "cell_j"]].min(axis=1).between(30, 480)]
    inside = inside[inside["mapped_single_gene"] & (inside["tile"] == inside["tile"].iloc[0])]
    first, second = inside.index[:2]
    table = cells.copy()
    table.loc[second, "cell_0"] = table.loc[first, "cell_0"]
    table = table.astype({"cell_barcode_0": pd.StringDtype(na_value=np.nan)})
    uid = f"1_A1_{table.loc[first, 'tile']}_{table.loc[first, 'cell_0']}"
    with pytest.warns(UserWarning, match=rf"1 duplicate cell ids, e.g. \['{uid}'\]"):
        adata = read_brieflow(
            table,
            tiff_root,
            tmp_path / "out",
            channel_names=CHANNELS,
            crop_size=40,
            progress=False,
        )
    assert [uid, f"{uid}-1"] == [n for n in adata.obs_names if n in (uid, f"{uid}-1")]
    assert not adata.obs_names.str.fullmatch(r"\d+").any()  # never replaced by positions
    on_disk = ad.read_h5ad(tmp_path / "out" / "cells.h5ad")
    assert list(on_disk.obs_names) == list(adata.obs_names)
    assert list(on_disk.obs["cell_barcode_0"]) == list(adata.obs["cell_barcode_0"])


def test_tables_of_several_wells_keep_their_rows_apart(brieflow, tmp_path):
    """Without a cell id column, parquet row numbers (0, 1, ... per file) do not collide."""
    tiff_root, _, cells, _ = brieflow
    table = cells.drop(columns=["cell_0"])
    parquets = [tmp_path / f"P-1_W-A1__part{k}__merge_final.parquet" for k in range(2)]
    half = len(table) // 2
    table.iloc[:half].to_parquet(parquets[0])
    table.iloc[half:].reset_index(drop=True).to_parquet(parquets[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        adata = read_brieflow(
            parquets,
            tiff_root,
            tmp_path / "out",
            channel_names=CHANNELS,
            crop_size=40,
            progress=False,
        )
    assert adata.obs_names.is_unique
    assert set(adata.obs_names.astype(int)) <= set(range(len(table)))


def test_ome_zarr_ngff_04_and_planes(tmp_path, eh):
    image, _ = eh
    write_ome_zarr(tmp_path / "v04", image, version="0.4")
    np.testing.assert_array_equal(read_ome_zarr(tmp_path / "v04"), image)
    group = zarr.open_group(str(tmp_path / "stack"), mode="w")
    group.attrs["multiscales"] = [{"axes": ["c", "z", "y", "x"], "datasets": [{"path": "0"}]}]
    group.create_array("0", shape=(3, 2, 8, 8), dtype="uint16")
    with pytest.raises(ValueError, match="2 planes along 'z'"):
        read_ome_zarr(tmp_path / "stack")


def test_bad_inputs_say_what_to_fix(brieflow, tmp_path):
    tiff_root, zarr_root, cells, _ = brieflow
    with pytest.raises(KeyError, match=r"lacks column\(s\) \['cell_i'\]"):
        read_brieflow(
            cells.drop(columns="cell_i"), tiff_root, tmp_path / "a", channel_names=CHANNELS
        )
    with pytest.raises(ValueError, match="pass channel_names="):
        read_brieflow(cells, tiff_root, tmp_path / "b")
    with pytest.raises(KeyError, match="gene_symbol_1.*perturbation_key="):
        read_brieflow(cells, tiff_root, tmp_path / "c", perturbation_key="gene_symbol_1")
    with pytest.raises(FileNotFoundError, match=r"phenotype/images/\*__illumination_corrected"):
        read_brieflow(cells, tiff_root, tmp_path / "d", image_kind="illumination_corrected")
    more = cells.assign(tile=cells["tile"] + 5)
    with pytest.raises(MissingTileError, match="No OME-Zarr image for 2 of 2 tiles.*A/1/5"):
        read_brieflow(more, zarr_root, tmp_path / "e")
    with pytest.raises(ValueError, match="No cells left"):
        read_brieflow(cells.assign(mapped_single_gene=False), tiff_root, tmp_path / "f")
    with pytest.raises(FileNotFoundError, match="merge_final"):
        read_brieflow(tmp_path, tiff_root, tmp_path / "g", channel_names=CHANNELS)


# --- reliability v2 --------------------------------------------------------------------------
def test_auto_crop_size_without_any_bounding_box_says_what_to_pass(brieflow, tmp_path):
    tiff_root, _, cells, _ = brieflow
    nan_bounds = cells.assign(**{f"cell_bounds_{i}": np.nan for i in range(4)})
    with pytest.raises(ValueError, match="no finite values.*Pass crop_size as a number"):
        read_brieflow(
            nan_bounds, tiff_root, tmp_path / "a", channel_names=CHANNELS, crop_size="auto"
        )


def test_unreadable_or_inconsistent_tables_are_named(brieflow, tmp_path):
    tiff_root, _, cells, _ = brieflow
    half = len(cells) // 2
    good, truncated = tmp_path / "P-1_W-A1__merge_final.parquet", tmp_path / "t.parquet"
    cells.iloc[:half].to_parquet(good)
    cells.iloc[half:].to_parquet(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"t\.parquet.*truncated or corrupt"):
        read_brieflow([good, truncated], tiff_root, tmp_path / "a", channel_names=CHANNELS)
    # a table without the perturbation column would give its cells NaN genes, silently
    no_genes = tmp_path / "P-1_W-A2__merge_final.parquet"
    cells.iloc[half:].drop(columns="gene_symbol_0").to_parquet(no_genes)
    with pytest.raises(KeyError, match=r"1 of 2 .*lack the column 'gene_symbol_0'.*A2__merge"):
        read_brieflow([good, no_genes], tiff_root, tmp_path / "b", channel_names=CHANNELS)


def test_mapped_single_gene_stored_as_text_is_read_as_booleans(brieflow, tmp_path):
    tiff_root, _, cells, _ = brieflow
    text = cells.assign(mapped_single_gene=cells["mapped_single_gene"].map(str))  # "True"/"False"
    adata = read_brieflow(
        text, tiff_root, tmp_path / "a", channel_names=CHANNELS, crop_size=40, progress=False
    )
    n_false = int((~cells["mapped_single_gene"]).sum())
    assert n_false > 0
    assert adata.uns["brieflow"]["n_dropped_not_single_gene"] == n_false
    with pytest.raises(ValueError, match=r"\['maybe'\].*single_gene_only=False"):
        read_brieflow(
            text.assign(mapped_single_gene="maybe"),
            tiff_root,
            tmp_path / "b",
            channel_names=CHANNELS,
        )


@pytest.mark.parametrize("column, value", [("plate", ".."), ("tile", "../../../x"), ("plate", "")])
def test_ome_zarr_paths_from_the_table_stay_in_the_tile_folder(brieflow, tmp_path, column, value):
    _, zarr_root, cells, _ = brieflow
    bad = cells.astype({column: object})
    bad.loc[bad.index[0], column] = value
    with pytest.raises(ValueError, match=f"{column} .*cannot be part of a file name"):
        read_brieflow(bad, zarr_root, tmp_path / "a", crop_size=40, progress=False)
    assert not (tmp_path / "a" / "crops.zarr").exists()
