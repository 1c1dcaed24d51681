from __future__ import annotations

import json
import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage
from skimage.measure import regionprops

from mcvi_ops.data import IncompleteStoreError, get_crops, open_crops
from mcvi_ops.data._images import UnreadableImageError
from mcvi_ops.io import MissingTileError, read_cells
from mcvi_ops.pp import align_channels, extract_crops


def _centroid_offsets(crops: np.ndarray, radius: int, centre: float) -> np.ndarray:
    """Distance of the intensity-weighted centroid (near the centre) from the crop centre."""
    d = crops.astype(float)
    d = np.clip(d - np.median(d, axis=(1, 2), keepdims=True), 0, None)
    yy, xx = np.mgrid[: d.shape[1], : d.shape[2]]
    disc = (yy - centre) ** 2 + (xx - centre) ** 2 <= radius**2
    w = d * disc
    total = w.sum((1, 2))
    cy, cx = (w * yy).sum((1, 2)) / total, (w * xx).sum((1, 2)) / total
    return np.hypot(cy - centre, cx - centre)


# --- ExampleHuman: the paper's preprocessing on a real field ------------------------------------
@pytest.fixture(scope="module")
def eh_adata(tmp_path_factory, paths, channels):
    out = tmp_path_factory.mktemp("eh")
    return extract_crops(
        paths["image"], paths["cells"], out, channel_names=channels, progress=False
    )


def test_examplehuman_counts_and_link(eh_adata, eh, tmp_path):
    image, cells = eh
    info = eh_adata.uns["extract_crops"]
    assert info["preset"] == "cellprofiler"
    assert info["y_key"] == "Nuclei_Location_Center_Y"
    assert info["n_cells_in"] == len(cells) == 289
    assert info["n_kept"] + info["n_dropped_edge"] == len(cells)
    assert info["n_dropped_nan"] == info["n_dropped_missing_tile"] == 0
    crops = get_crops(eh_adata)
    assert crops.shape == (info["n_kept"], 3, 100, 100)
    assert crops.dtype == np.uint16
    # the AnnData written next to the store is the returned one
    again = ad.read_h5ad(eh_adata.uns["crops"]["url"].replace("crops.zarr", "cells.h5ad"))
    assert list(again.obs_names) == list(eh_adata.obs_names)
    np.testing.assert_array_equal(get_crops(again, [0, 5]), crops[[0, 5]])


def test_examplehuman_crops_are_centred(eh_adata):
    dna = get_crops(eh_adata)[:, 0]
    offsets = _centroid_offsets(dna, radius=12, centre=50)
    assert (offsets < 3).mean() > 0.8
    # control: the same measure on windows displaced by 8 px is clearly worse
    displaced = _centroid_offsets(dna[:, 8:, 8:], radius=12, centre=50)
    assert (displaced < 3).mean() < 0.4


def test_examplehuman_edge_filter_exact(eh_adata, eh):
    image, cells = eh
    rows = np.floor(cells["Nuclei_Location_Center_Y"] + 0.5)
    cols = np.floor(cells["Nuclei_Location_Center_X"] + 0.5)
    inside = (rows >= 50) & (cols >= 50) & (512 - rows >= 50) & (512 - cols >= 50)
    assert eh_adata.uns["extract_crops"]["n_dropped_edge"] == int((~inside).sum())
    np.testing.assert_array_equal(
        eh_adata.obs["Metadata_ObjectNumber"].to_numpy(),
        cells.loc[inside, "Metadata_ObjectNumber"].to_numpy(),
    )


def test_raw_crops_and_small_margin(eh, tmp_path, channels):
    image, cells = eh
    adata = extract_crops(
        image,
        cells,
        tmp_path,
        channel_names=channels,
        align=False,
        clip_percentiles=None,
        edge_margin=10,
        progress=False,
    )
    rows = np.floor(cells["Nuclei_Location_Center_Y"].to_numpy() + 0.5).astype(int)
    cols = np.floor(cells["Nuclei_Location_Center_X"].to_numpy() + 0.5).astype(int)
    inside = (rows >= 10) & (cols >= 10) & (512 - rows >= 10) & (512 - cols >= 10)
    assert adata.n_obs == inside.sum()
    crops = get_crops(adata)
    padded = np.pad(image, ((0, 0), (50, 50), (50, 50)))
    for k, (r, c) in enumerate(zip(rows[inside], cols[inside], strict=True)):
        np.testing.assert_array_equal(crops[k], padded[:, r : r + 100, c : c + 100])


def test_examplehuman_finds_mitotic_cells(eh_adata, eh):
    image, cells = eh
    # mitotic cells: bright phospho-histone H3 at the nucleus, measured on the raw image
    rows = np.floor(eh_adata.obs["Nuclei_Location_Center_Y"].to_numpy() + 0.5).astype(int)
    cols = np.floor(eh_adata.obs["Nuclei_Location_Center_X"].to_numpy() + 0.5).astype(int)
    raw_ph3 = np.array(
        [image[1, r - 3 : r + 4, c - 3 : c + 4].mean() for r, c in zip(rows, cols, strict=True)]
    )
    crop_ph3 = get_crops(eh_adata)[:, 1, 47:54, 47:54].mean(axis=(1, 2))
    background = np.median(image[1])
    mitotic = crop_ph3 > background + 25
    assert 2 <= mitotic.sum() <= 0.2 * len(mitotic)
    np.testing.assert_array_equal(mitotic, raw_ph3 > background + 25)


# --- StarDist nuclei: centroids from a label mask -------------------------------------------------
def test_stardist_mask_centroids(paths, tmp_path):
    img = tifffile.imread(paths["stardist"] / "img2d.tif")
    mask = tifffile.imread(paths["stardist"] / "mask2d.tif")
    props = regionprops(mask)
    cells = pd.DataFrame(
        {
            "label": [p.label for p in props],
            "y": [p.centroid[0] for p in props],
            "x": [p.centroid[1] for p in props],
        }
    )
    adata = extract_crops(
        np.stack([img, mask], axis=-1),
        cells,
        tmp_path,
        channel_names=["nuclei", "mask"],
        channel_axis="last",
        y_key="y",
        x_key="x",
        crop_size=32,
        align=False,
        clip_percentiles=None,
        progress=False,
    )
    assert adata.uns["extract_crops"]["preset"] is None
    crops = get_crops(adata)
    centre_label = crops[:, 1, 16, 16]
    assert (centre_label == adata.obs["label"].to_numpy()).mean() > 0.95
    assert 0.8 * len(cells) < adata.n_obs <= len(cells)


# --- alignment -----------------------------------------------------------------------------------
@pytest.mark.parametrize("truth", [(2.3, -1.7), (-0.6, 0.4)])
def test_alignment_recovers_subpixel_shift(eh, truth):
    image, _ = eh
    dna = image[0].astype(np.float32)
    shifted = ndimage.shift(dna, truth, order=3, mode="nearest")
    aligned, shifts = align_channels(np.stack([dna, shifted]))
    np.testing.assert_allclose(shifts[1], -np.asarray(truth), atol=0.25)
    _, residual = align_channels(aligned, upsample_factor=20)
    assert np.abs(residual[1]).max() <= 0.25


def test_alignment_across_stains(eh, tmp_path, channels):
    image, cells = eh
    truth = np.array([1.6, -2.4])
    moved = image.astype(np.float32)
    moved[2] = ndimage.shift(moved[2], truth, order=3, mode="nearest")
    _, base = align_channels(image)
    _, shifts = align_channels(moved)
    # different stains have no exact common shift: the extra shift is found to ~0.3 px
    np.testing.assert_allclose(shifts[2] - base[2], -truth, atol=0.4)
    adata = extract_crops(
        moved, cells, tmp_path, channel_names=channels, dtype="float32", progress=False
    )
    recorded = np.asarray(adata.uns["extract_crops"]["shifts"])[0]
    np.testing.assert_allclose(recorded, shifts, atol=1e-3)


# --- multi-tile, order, parallel, resume ----------------------------------------------------------
def test_funk_preset_and_tile_order(tiles, tmp_path, channels):
    template, table, images = tiles
    adata = extract_crops(template, table, tmp_path, channel_names=channels, progress=False)
    info = adata.uns["extract_crops"]
    assert info["preset"] == "funk"
    assert info["tile_key"] == ["well", "tile"]
    assert (info["y_key"], info["x_key"]) == ("cell_i", "cell_j")
    # tiles sorted by key, cells in table order within a tile
    tiles_seen = adata.obs["tile"].to_numpy()
    assert (np.diff(tiles_seen) >= 0).all()
    for tile in range(3):
        rows = adata.obs.index[tiles_seen == tile].astype(int)
        assert (np.diff(rows) > 0).all()
    assert info["n_kept"] == adata.n_obs


def test_categorical_tile_keys_crop_like_plain_ones(tiles, tmp_path, channels):
    """Categorical key columns (an h5ad's obs) sort by value, skip unused categories, warn not."""
    template, table, _ = tiles
    kwargs = {"channel_names": channels, "align": False, "progress": False}
    plain = extract_crops(template, table, tmp_path / "plain", **kwargs)
    categorical = table.astype(
        {"well": pd.CategoricalDtype(["B2", "A1"]), "tile": pd.CategoricalDtype([9, 2, 1, 0])}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # pandas' groupby `observed` deprecation
        adata = extract_crops(template, categorical, tmp_path / "categorical", **kwargs)
    info, expected = adata.uns["extract_crops"], plain.uns["extract_crops"]
    assert info["tile_labels"] == expected["tile_labels"]
    assert info["n_tiles"] == 3  # no tile for the unused categories
    assert list(adata.obs_names) == list(plain.obs_names)
    np.testing.assert_array_equal(get_crops(adata), get_crops(plain))


def test_pandas_string_columns_are_written(tiles, tmp_path, channels):
    """pandas 3 makes text columns string arrays, which anndata writes only when told to."""
    template, table, _ = tiles
    text = pd.StringDtype(na_value=np.nan)  # pandas 3's default "str" dtype
    table = table.assign(barcode=[f"bc{i}" for i in range(len(table))]).astype(
        {"well": text, "gene_symbol_0": "string", "barcode": text}
    )
    table.index = pd.Index([f"cell{i}" for i in table.index], dtype=text)
    adata = extract_crops(
        template, table, tmp_path, channel_names=channels, align=False, progress=False
    )
    back = ad.read_h5ad(tmp_path / "cells.h5ad")
    assert list(back.obs_names) == list(adata.obs_names)
    assert list(back.obs["barcode"]) == list(table.loc[adata.obs_names, "barcode"])
    assert list(back.obs["gene_symbol_0"]) == list(table.loc[adata.obs_names, "gene_symbol_0"])


def test_n_jobs_2_equals_1(tiles, tmp_path, channels, same_store):
    template, table, _ = tiles
    one = extract_crops(
        template, table, tmp_path / "one", channel_names=channels, resize_to=64, progress=False
    )
    two = extract_crops(
        template,
        table,
        tmp_path / "two",
        channel_names=channels,
        resize_to=64,
        n_jobs=2,
        progress=False,
    )
    pd.testing.assert_frame_equal(one.obs, two.obs)
    same_store(tmp_path / "one" / "crops.zarr", tmp_path / "two" / "crops.zarr")
    assert get_crops(two).shape[1:] == (3, 64, 64)


class _Loader:
    """Tile loader that fails on one tile the first time, like a crash mid-run."""

    def __init__(self, images, fail_on=None):
        self.images, self.fail_on, self.calls = images, fail_on, []

    def __call__(self, key):
        self.calls.append(key)
        if key[1] == self.fail_on:
            raise RuntimeError(f"simulated crash on tile {key}")
        return self.images[key[1]]


def _same_adata(a, b):
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert a.uns["extract_crops"] == b.uns["extract_crops"]
    ref_a, ref_b = dict(a.uns["crops"]), dict(b.uns["crops"])
    for key in ("url", "store_id"):  # every store gets its own random id
        ref_a.pop(key), ref_b.pop(key)
    assert ref_a == ref_b


def test_resume_after_crash_is_identical(tiles, tmp_path, channels, same_store):
    _, table, images = tiles
    kwargs = {"channel_names": channels, "chunk_cells": 64, "progress": False}
    reference = extract_crops(_Loader(images), table, tmp_path / "ref", **kwargs)

    crashing = _Loader(images, fail_on=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_crops(crashing, table, tmp_path / "run", **kwargs)
    log = (tmp_path / "run" / "extract_log.jsonl").read_text().splitlines()
    assert len(log) == 1 + 2  # header + tiles 0 and 1 committed
    # make it worse: rows of an uncommitted tile in the store and a torn log line
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        open_crops(tmp_path / "run" / "crops.zarr")
    store = open_crops(tmp_path / "run" / "crops.zarr", allow_incomplete=True)
    committed = json.loads(log[-1])["stop"]
    assert store.n_cells == committed
    import zarr

    array = zarr.open_group(str(tmp_path / "run" / "crops.zarr"), mode="r+")["crops"]
    array.resize((committed + 40, *array.shape[1:]))
    array[committed:] = 7
    with open(tmp_path / "run" / "extract_log.jsonl", "a") as fh:
        fh.write('{"kind": "tile", "index": 2, "sta')

    resumed_loader = _Loader(images)
    resumed = extract_crops(resumed_loader, table, tmp_path / "run", **kwargs)
    assert [k[1] for k in resumed_loader.calls] == [2]  # finished tiles were skipped
    _same_adata(resumed, reference)
    same_store(tmp_path / "run" / "crops.zarr", tmp_path / "ref" / "crops.zarr")
    np.testing.assert_array_equal(get_crops(resumed), get_crops(reference))
    # a finished run reruns as a no-op with the same result
    again_loader = _Loader(images)
    again = extract_crops(again_loader, table, tmp_path / "run", **kwargs)
    assert again_loader.calls == []
    _same_adata(again, reference)


def test_resume_refuses_changed_settings(tiles, tmp_path, channels):
    template, table, _ = tiles
    extract_crops(template, table, tmp_path, channel_names=channels, progress=False)
    with pytest.raises(FileExistsError, match="different settings.*crop_size|overwrite=True"):
        extract_crops(
            template, table, tmp_path, channel_names=channels, crop_size=64, progress=False
        )
    adata = extract_crops(
        template,
        table,
        tmp_path,
        channel_names=channels,
        crop_size=64,
        overwrite=True,
        progress=False,
    )
    assert get_crops(adata, [0]).shape == (1, 3, 64, 64)


# --- bad input -----------------------------------------------------------------------------------
def test_missing_tile_raises_or_skips(tiles, tmp_path, channels):
    template, table, _ = tiles
    (tmp_path / "tiles" / "A1_Tile-2.tif").unlink()
    with pytest.raises(MissingTileError, match=r"well='A1', tile=2.*on_missing_tile='skip'"):
        extract_crops(template, table, tmp_path / "a", channel_names=channels, progress=False)
    adata = extract_crops(
        template,
        table,
        tmp_path / "b",
        channel_names=channels,
        on_missing_tile="skip",
        progress=False,
    )
    info = adata.uns["extract_crops"]
    assert info["n_dropped_missing_tile"] == (table.tile == 2).sum()
    assert 2 not in set(adata.obs["tile"])
    assert info["n_kept"] + info["n_dropped_edge"] + info["n_dropped_missing_tile"] == len(table)


def test_missing_tile_from_callable(tiles, tmp_path, channels):
    _, table, images = tiles
    images = dict(images)
    del images[2]

    def loader(key):
        return images[key[1]]  # KeyError for tile 2

    with pytest.raises(MissingTileError, match="tile=2"):
        extract_crops(loader, table, tmp_path / "a", channel_names=channels, progress=False)
    adata = extract_crops(
        loader,
        table,
        tmp_path / "a",
        channel_names=channels,
        on_missing_tile="skip",
        progress=False,
        overwrite=True,
    )
    assert adata.uns["extract_crops"]["n_dropped_missing_tile"] == (table.tile == 2).sum()


def test_missing_centroid_column(eh, tmp_path, channels):
    image, cells = eh
    with pytest.raises(KeyError, match="Nuclei_Location_Center_X.*x_key="):
        extract_crops(
            image,
            cells.drop(columns="Nuclei_Location_Center_X"),
            tmp_path,
            channel_names=channels,
            preset="cellprofiler",
            progress=False,
        )
    with pytest.raises(KeyError, match="'centre_y'.*y_key="):
        extract_crops(
            image,
            cells,
            tmp_path,
            channel_names=channels,
            y_key="centre_y",
            x_key="x",
            progress=False,
        )


def test_nan_centroids_dropped_and_counted(eh, tmp_path, channels):
    image, cells = eh
    cells = cells.copy()
    cells.loc[[3, 100, 200], "Nuclei_Location_Center_Y"] = np.nan
    adata = extract_crops(image, cells, tmp_path, channel_names=channels, progress=False)
    info = adata.uns["extract_crops"]
    assert info["n_dropped_nan"] == 3
    assert not {"3", "100", "200"} & set(adata.obs_names)
    assert info["n_kept"] + info["n_dropped_edge"] + 3 == len(cells)


def test_wrong_number_of_channels(eh, tmp_path, channels):
    image, cells = eh
    with pytest.raises(ValueError, match=r"Tile .*2 channels.*3 channel names.*channel_axis"):
        extract_crops(image[:2], cells, tmp_path, channel_names=channels, progress=False)
    with pytest.raises(ValueError, match=r"channel_axis='last'.*512 channels"):
        extract_crops(
            image,
            cells,
            tmp_path / "b",
            channel_names=channels,
            channel_axis="last",
            progress=False,
        )


def test_float_tiles_need_float_dtype(eh, tmp_path, channels):
    image, cells = eh
    with pytest.raises(TypeError, match="dtype='float32'"):
        extract_crops(
            image.astype(np.float32) / 255,
            cells,
            tmp_path,
            channel_names=channels,
            progress=False,
        )


def test_read_cells_formats(paths, tmp_path):
    cells = read_cells(paths["funk_info"])
    cells.to_parquet(tmp_path / "cells.parquet")
    cells.to_csv(tmp_path / "cells.tsv", sep="\t", index=False)
    pd.testing.assert_frame_equal(read_cells(tmp_path / "cells.parquet"), cells)
    pd.testing.assert_frame_equal(read_cells(tmp_path / "cells.tsv"), cells)
    with pytest.raises(ValueError, match="csv"):
        read_cells(paths["image"])


def test_funk_table_on_mirrored_tile(paths, eh, tmp_path, channels):
    """The real Funk phenotype table (i/j naming) on a tile mirrored up to its size."""
    image, _ = eh
    info = read_cells(paths["funk_info"])
    info = info[(info["i"] < 1000) & (info["j"] < 1000)]  # one corner keeps the test fast
    size = 1024
    reps = int(np.ceil(size / 512))
    row = np.concatenate([image, image[:, :, ::-1]] * reps, axis=2)[:, :, :size]
    tile = np.concatenate([row, row[:, ::-1]] * reps, axis=1)[:, :size]
    tifffile.imwrite(tmp_path / "A1_1.tif", tile, photometric="minisblack")
    adata = extract_crops(
        tmp_path,
        info,
        tmp_path / "out",
        channel_names=channels,
        resize_to=32,
        align=False,
        progress=False,
    )
    meta = adata.uns["extract_crops"]
    assert (meta["y_key"], meta["x_key"], meta["tile_key"]) == ("i", "j", ["well", "tile"])
    rows, cols = np.floor(info["i"] + 0.5), np.floor(info["j"] + 0.5)
    inside = (rows >= 50) & (cols >= 50) & (size - rows >= 50) & (size - cols >= 50)
    assert adata.n_obs == inside.sum()
    assert get_crops(adata, [0]).shape == (1, 3, 32, 32)


# --- ingestion checks ----------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["../../outside", "/etc"])
def test_tile_template_cannot_leave_its_folder(tiles, tmp_path, channels, value):
    template, table, _ = tiles
    table = table.copy()
    table.loc[table.index[5], "well"] = value
    with pytest.raises(ValueError, match=rf"Row '5'.*well='{value}'.*outside the tile folder"):
        extract_crops(template, table, tmp_path / "out", channel_names=channels, progress=False)
    assert not (tmp_path / "out").exists()


def test_nan_tile_key_names_the_rows(tiles, tmp_path, channels):
    template, table, _ = tiles
    table = table.copy()
    table.loc[[7, 300], "tile"] = np.nan
    with pytest.raises(ValueError, match=r"2 cells have no tile key.*\['7', '300'\]"):
        extract_crops(template, table, tmp_path, channel_names=channels, progress=False)


def test_duplicate_cell_ids_are_kept_unique_with_a_warning(eh, tmp_path, channels):
    image, cells = eh
    cells = cells.set_index(pd.Index(["c"] * 10 + [f"id{i}" for i in range(len(cells) - 10)]))
    with pytest.warns(UserWarning, match=r"1 duplicate cell ids, e.g. \['c'\]"):
        adata = extract_crops(
            image, cells, tmp_path, channel_names=channels, align=False, progress=False
        )
    assert adata.obs_names.is_unique
    kept = adata.obs_names[adata.obs_names.str.startswith("id")]
    assert len(kept) and all(cells.index.get_loc(name) >= 10 for name in kept)  # ids survive
    assert not adata.obs_names.str.fullmatch(r"\d+").any()  # never replaced by positions


def test_read_cells_warns_about_duplicate_ids(tmp_path):
    pd.DataFrame({"id": ["a", "a", "b"], "x": [1, 2, 3]}).to_csv(tmp_path / "c.csv", index=False)
    with pytest.warns(UserWarning, match=r"1 duplicate ids.*\['a'\]"):
        table = read_cells(tmp_path / "c.csv", index_col="id")
    assert list(table.index) == ["a", "a", "b"]


def test_corrupt_tile_raises_naming_the_file_or_is_skipped(tiles, tmp_path, channels, caplog):
    template, table, _ = tiles
    tile = tmp_path / "tiles" / "A1_Tile-1.tif"
    tile.write_bytes(tile.read_bytes()[: tile.stat().st_size // 2])  # a truncated copy
    with pytest.raises(UnreadableImageError, match=r"tile=1.*A1_Tile-1.tif.*truncated"):
        extract_crops(template, table, tmp_path / "a", channel_names=channels, progress=False)
    for n_jobs in (1, 2):
        with caplog.at_level(logging.WARNING):
            adata = extract_crops(
                template,
                table,
                tmp_path / f"skip{n_jobs}",
                channel_names=channels,
                on_error="skip",
                n_jobs=n_jobs,
                progress=False,
            )
        info = adata.uns["extract_crops"]
        assert info["n_dropped_unreadable_tile"] == (table.tile == 1).sum()
        assert info["unreadable_tiles"][0][0] == "well='A1', tile=1"
        assert 1 not in set(adata.obs["tile"])
    assert "Skipping tile well='A1', tile=1" in caplog.text


def test_nonfinite_tile_pixels_raise_or_are_zeroed(eh, tmp_path, channels):
    image, cells = eh
    tile = image.astype(np.float32)
    y, x = 260, 240
    tile[1, y, x] = np.nan
    tile[2, y + 1, x] = np.inf
    # cells whose 100 px crop (rows r-50..r+49, columns c-50..c+49) holds each bad pixel
    rows = np.floor(cells["Nuclei_Location_Center_Y"].to_numpy() + 0.5)
    cols = np.floor(cells["Nuclei_Location_Center_X"].to_numpy() + 0.5)
    kept = (rows >= 50) & (cols >= 50) & (rows <= 462) & (cols <= 462)

    def holds(py, px):
        return kept & (rows - 50 <= py) & (py < rows + 50) & (cols - 50 <= px) & (px < cols + 50)

    hit = holds(y, x) | holds(y + 1, x)
    n_values = int(holds(y, x).sum() + holds(y + 1, x).sum())
    first = cells.index[hit][0]
    kwargs = {"channel_names": channels, "dtype": "float32", "progress": False}
    pattern = (
        rf"holds 2 NaN or infinite pixels, {n_values} of them inside the crops of {hit.sum()} "
        rf"cells \(e.g. \['{first}'.*nonfinite='zero'"
    )
    with pytest.raises(ValueError, match=pattern):
        extract_crops(tile, cells, tmp_path / "a", **kwargs)
    adata = extract_crops(tile, cells, tmp_path / "b", nonfinite="zero", **kwargs)
    info = adata.uns["extract_crops"]
    assert (info["n_nonfinite_values"], info["n_nonfinite_cells"]) == (n_values, hit.sum())
    store = open_crops(tmp_path / "b" / "crops.zarr")
    assert store.nonfinite == {"policy": "zero", "n_values": n_values, "n_cells": int(hit.sum())}
    crops = get_crops(adata)
    assert np.isfinite(crops).all()
    # zeroed before alignment and clipping, which would spread NaN over the whole tile: crops
    # away from the bad pixels match those of the clean tile (up to a tiny alignment change)
    clean = extract_crops(image.astype(np.float32), cells, tmp_path / "c", **kwargs)
    far = np.flatnonzero(~hit[kept])
    close = np.isclose(get_crops(adata, far), get_crops(clean, far), rtol=0.02, atol=2)
    assert close.mean() > 0.9999


def test_values_float32_or_uint16_cannot_hold(eh, tmp_path, channels):
    image, cells = eh
    big = image.astype(np.int32)
    big[0, 0, 0] = 2**24 + 5
    with pytest.raises(
        ValueError, match=r"Tile Metadata_ImageNumber=1 holds int32 values beyond 2\*\*24"
    ):
        extract_crops(big, cells, tmp_path / "a", channel_names=channels, progress=False)
    over = image.astype(np.int32)
    over[0, 100, 100] = 70_000
    with pytest.raises(ValueError, match=r"outside the uint16 range.*dtype='float32'"):
        extract_crops(
            over,
            cells,
            tmp_path / "b",
            channel_names=channels,
            align=False,
            clip_percentiles=None,
            progress=False,
        )
    with pytest.raises(ValueError, match="got the string 'DNA'"):
        extract_crops(image, cells, tmp_path / "c", channel_names="DNA", progress=False)


def test_fourier_shift_matches_a_phase_ramp():
    """scipy's Fourier shift gives what the hand-written phase ramp it replaced gave."""
    from scipy import fft

    from mcvi_ops.pp._align import _fourier_shift

    image = np.random.default_rng(0).random((48, 60)).astype(np.float32)
    spectrum = fft.fft2(image)
    for shift in ([1.3, -2.7], [0.0, 0.5], [-5.25, 3.0]):
        ky = fft.fftfreq(48)[:, None]
        kx = fft.fftfreq(60)[None, :]
        ramp = np.exp(-2j * np.pi * (shift[0] * ky + shift[1] * kx))
        expected = fft.ifft2(spectrum * ramp).real
        np.testing.assert_allclose(_fourier_shift(spectrum, np.array(shift)), expected, atol=1e-5)
