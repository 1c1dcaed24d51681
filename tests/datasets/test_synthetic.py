"""Tests of `mcvi_ops.datasets.synthetic_screen`: layout, determinism, artefacts and effects."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from mcvi_ops.data import get_crops, open_crops
from mcvi_ops.datasets import synthetic_screen

CHANNELS = ["DAPI", "tubulin", "gH2AX", "phalloidin"]
OFFSET = 100.0  # camera offset of the simulator


@pytest.fixture(scope="module")
def screen() -> ad.AnnData:
    return synthetic_screen(n_cells=2000, seed=0)


@pytest.fixture(scope="module")
def crops(screen) -> np.ndarray:
    return get_crops(screen).astype(np.float32) - OFFSET


@pytest.fixture(scope="module")
def effect_of(screen) -> pd.Series:
    truth = screen.uns["ground_truth"]["effect"]
    return screen.obs["gene_symbol"].astype(str).map(truth).fillna("control")


# --- simple image statistics, computed independently of the simulator ---------------------------
def _nuclei(dapi: np.ndarray) -> tuple[np.ndarray, int]:
    smooth = ndimage.gaussian_filter(dapi, 1.0)
    labels, n = ndimage.label(smooth > 0.3 * smooth.max())
    return labels, n


def _central_objects(dapi: np.ndarray, radius: float = 0.45) -> list[float]:
    """Areas of the DAPI objects whose centroid lies within `radius` of the crop centre."""
    labels, n = _nuclei(dapi)
    if not n:
        return []
    size = dapi.shape[-1]
    centres = np.array(ndimage.center_of_mass(np.ones_like(dapi), labels, range(1, n + 1)))
    areas = ndimage.sum(np.ones_like(dapi), labels, range(1, n + 1))
    dist = np.hypot(*(centres - (size - 1) / 2).T) / (size / 2)
    return [float(a) for a, d in zip(areas, dist, strict=True) if d < radius and a >= 4]


def n_dapi_objects(crop: np.ndarray) -> int:
    return len(_central_objects(crop[0]))


def nuclear_area(crop: np.ndarray) -> float:
    areas = _central_objects(crop[0])
    return max(areas) if areas else 0.0


def puncta_score(crop: np.ndarray) -> float:
    """Brightest small tubulin spot relative to the typical cytoplasm."""
    tub = crop[1]
    dog = ndimage.gaussian_filter(tub, 1.0) - ndimage.gaussian_filter(tub, 4.0)
    cyto = tub[tub > 0.2 * np.percentile(tub, 99)]
    return float(dog.max() / np.median(cyto))


def ring_score(crop: np.ndarray) -> float:
    """F-actin just outside the central nucleus relative to the cell's F-actin."""
    labels, n = _nuclei(crop[0])
    size = crop.shape[-1]
    centre = labels[size // 2 - 3 : size // 2 + 3, size // 2 - 3 : size // 2 + 3]
    ids = centre[centre > 0]
    if not ids.size:
        return 0.0
    nucleus = labels == np.bincount(ids).argmax()
    shell = ndimage.binary_dilation(nucleus, iterations=max(2, size // 10)) & ~nucleus
    actin = crop[3]
    cell = actin > 0.15 * np.percentile(actin, 99)
    return float(actin[shell].mean() / np.median(actin[cell]))


def _stat(crops_: np.ndarray, fn) -> np.ndarray:
    return np.array([fn(c) for c in crops_])


def _interphase_controls(screen, effect_of) -> np.ndarray:
    return ((effect_of == "control") & (screen.obs["stage"] == "interphase")).to_numpy()


# --- layout ------------------------------------------------------------------------------------
def test_layout(screen):
    assert screen.n_obs == 2000
    assert screen.X.ndim == 2 and screen.X.shape[1] <= 8
    expected = [
        "plate", "well", "tile", "cell_i", "cell_j", "sgRNA", "gene_symbol", "stage",
        "effect_kind", "affected", "crop_index",
    ]  # fmt: skip
    assert set(expected) <= set(screen.obs.columns)
    obs = screen.obs
    for col in ("plate", "well", "sgRNA", "gene_symbol", "stage", "effect_kind"):
        assert isinstance(obs[col].dtype, pd.CategoricalDtype), col
    assert obs["affected"].dtype == bool
    assert np.issubdtype(obs["tile"].dtype, np.integer)
    assert obs["cell_i"].between(0, 2960).all() and obs["cell_j"].between(0, 2960).all()
    assert set(obs["stage"]) == {"interphase", "mitotic"}
    assert set(obs["well"]) == {"A1", "A2", "A3", "B1"}
    assert "nontargeting" in set(obs["gene_symbol"])
    assert not obs.loc[obs["effect_kind"] == "control", "affected"].any()
    assert not obs.loc[obs["effect_kind"] == "none", "affected"].any()
    assert (obs["effect_kind"] == "control").mean() == pytest.approx(0.25, abs=0.01)

    info = screen.uns["synthetic_screen"]
    assert info["tile_size"] == 2960 and info["tile_grid"] == [6, 6]
    assert info["tile_order"] == "row-major" and info["pixel_size"] == pytest.approx(0.3036)
    assert info["channel_names"] == CHANNELS and info["seed"] == 0 and info["n_genes"] == 60
    assert obs["tile"].max() < 36

    truth = screen.uns["ground_truth"]
    assert list(truth.columns[:5]) == ["complex", "effect_kind", "novel", "effect", "strength"]
    assert truth.index.name == "gene_symbol" and len(truth) == 60
    assert set(truth["effect_kind"]) == {"none", "shift", "novel"}
    assert (truth["novel"] == (truth["effect_kind"] == "novel")).all()
    assert 0.25 <= (truth["effect_kind"] == "none").mean() <= 0.35
    sizes = truth.loc[truth["complex"] != "none"].groupby("complex").size()
    assert sizes.between(3, 6).all()
    # genes of a complex share one effect, and every effect is present
    assert (truth.groupby("complex")["effect"].nunique() == 1).all()
    assert truth["effect"].nunique() == 10
    guides = screen.uns["guide_truth"]
    assert guides.index.name == "sgRNA" and len(guides) == 60 * 4 + 20
    assert set(obs["sgRNA"]) == set(guides.index)
    targeting = guides["gene_symbol"] != "nontargeting"
    assert guides.loc[targeting, "efficiency"].between(0.4, 1.0).all()
    assert (
        guides.loc[obs["sgRNA"].astype(str), "gene_symbol"].to_numpy() == obs["gene_symbol"]
    ).all()

    crops = get_crops(screen, [0, 5, 1999])
    assert crops.shape == (3, 4, 64, 64) and crops.dtype == np.uint16
    assert open_crops(screen.uns["crops"]["url"]).channel_names == CHANNELS


def test_crop_size_100():
    small = synthetic_screen(n_cells=300, n_genes=10, n_control_guides=5, crop_size=100, seed=3)
    crops = get_crops(small)
    assert crops.shape == (300, 4, 100, 100) and crops.dtype == np.uint16
    assert crops[:, 0].max() > 1000  # nuclei are drawn


# --- determinism and streaming -------------------------------------------------------------------
SMALL = {"n_cells": 700, "n_genes": 12, "n_control_guides": 8, "crop_size": 32}


def test_deterministic():
    a, b = synthetic_screen(**SMALL, seed=5), synthetic_screen(**SMALL, seed=5)
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.uns["ground_truth"], b.uns["ground_truth"])
    np.testing.assert_array_equal(get_crops(a), get_crops(b))
    assert a.uns["crops"]["url"] != b.uns["crops"]["url"]  # separate in-memory stores
    c = synthetic_screen(**SMALL, seed=6)
    assert not np.array_equal(get_crops(a), get_crops(c))
    assert not a.obs["sgRNA"].equals(c.obs["sgRNA"])


def test_streaming_to_disk_matches_memory(tmp_path):
    memory = synthetic_screen(**SMALL, seed=2)
    path = tmp_path / "screen.zarr"
    disk = synthetic_screen(**SMALL, seed=2, path=path, batch_size=97, chunk_cells=50)
    assert path.exists()
    pd.testing.assert_frame_equal(memory.obs, disk.obs)
    np.testing.assert_array_equal(get_crops(memory), get_crops(disk))
    np.testing.assert_allclose(memory.X, disk.X)
    store = open_crops(path)
    assert store.chunk_cells == 50 and store.n_cells == SMALL["n_cells"]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        synthetic_screen(**SMALL, seed=2, path=path)
    again = synthetic_screen(**SMALL, seed=3, path=path, overwrite=True)
    assert not np.array_equal(get_crops(again), get_crops(memory))


# --- the screen's own known relationships ----------------------------------------------------
def test_complexes_in_uns_match_the_ground_truth(screen):
    complexes = screen.uns["synthetic_screen"]["complexes"]
    truth = screen.uns["ground_truth"]
    with_complex = truth[truth["complex"] != "none"]
    assert set(complexes) == set(with_complex["complex"])
    for name, members in complexes.items():
        assert sorted(members) == sorted(with_complex.index[with_complex["complex"] == name])
        assert with_complex.loc[members, "effect"].nunique() == 1  # one effect per complex
    assert "complexes_file" not in screen.uns["synthetic_screen"]  # in memory: no file


def test_complexes_file_beside_the_store(tmp_path):
    from mcvi_ops.metrics import known_relationships, read_gene_sets, read_relationships

    path = tmp_path / "run1" / "screen.zarr"
    adata = synthetic_screen(**SMALL, seed=4, path=path)
    gmt = tmp_path / "run1" / "screen_complexes.gmt"
    assert adata.uns["synthetic_screen"]["complexes_file"] == str(gmt)
    sets = read_gene_sets(gmt, format="gmt")
    assert sets == adata.uns["synthetic_screen"]["complexes"]
    truth = adata.uns["ground_truth"]
    for line in gmt.read_text().splitlines():
        name, description, *members = line.split("\t")
        effect = truth.loc[members[0], "effect"]
        assert description == f"simulated {effect} ({truth.loc[members[0], 'effect_kind']})"
    # a gene embedding that is its complex's one-hot code recovers every pair
    pairs = read_relationships(gmt)
    assert len(pairs) == sum(len(m) * (len(m) - 1) // 2 for m in sets.values())
    genes = ad.AnnData(obs=pd.DataFrame(index=truth.index.astype(str)))
    codes = pd.factorize(truth["complex"])[0]
    genes.obsm["onehot"] = np.eye(codes.max() + 1)[codes] + 1e-3
    scores = known_relationships(genes, use_rep="onehot", relationships=str(gmt), min_pairs=1)
    ap = scores.query("metric == 'average_precision'")["value"].item()
    assert ap == pytest.approx(1.0)


def test_complexes_file_is_not_overwritten_silently(tmp_path):
    path = tmp_path / "screen.zarr"
    gmt = tmp_path / "screen_complexes.gmt"
    gmt.write_text("mine\n")
    with pytest.raises(
        FileExistsError, match="screen_complexes.gmt already exists.*overwrite=True"
    ):
        synthetic_screen(**SMALL, seed=4, path=path)
    assert gmt.read_text() == "mine\n" and not path.exists()
    synthetic_screen(**SMALL, seed=4, path=path, overwrite=True)
    assert gmt.read_text().startswith("CPLX01\t")


def test_complexes_file_next_to_a_url_store():
    import fsspec

    adata = synthetic_screen(**SMALL, seed=4, path="memory://gmt-test/screen.zarr")
    target = adata.uns["synthetic_screen"]["complexes_file"]
    assert target == "memory://gmt-test/screen_complexes.gmt"
    with fsspec.open(target, "r") as fh:
        assert fh.read().count("\n") == len(adata.uns["synthetic_screen"]["complexes"])


# --- technical artefacts ---------------------------------------------------------------------
def test_vignetting_dims_the_edge_of_the_field(screen, crops):
    dist = np.hypot(screen.obs["cell_i"] - 1480, screen.obs["cell_j"] - 1480).to_numpy()
    brightness = crops.mean(axis=(1, 2, 3))
    centre, edge = brightness[dist < 450].mean(), brightness[dist >= 1200].mean()
    assert edge < 0.92 * centre


def test_well_edge_tiles_are_denser_with_smaller_cells(screen, crops, effect_of):
    rows, cols = screen.uns["synthetic_screen"]["tile_grid"]
    t_row, t_col = np.divmod(screen.obs["tile"].to_numpy(), cols)
    edge = (t_row == 0) | (t_row == rows - 1) | (t_col == 0) | (t_col == cols - 1)
    n_edge_tiles = 2 * (rows + cols) - 4
    per_tile_edge = edge.sum() / n_edge_tiles
    per_tile_centre = (~edge).sum() / (rows * cols - n_edge_tiles)
    assert per_tile_edge > 1.3 * per_tile_centre

    plain = ((effect_of == "control") | (effect_of == "none")).to_numpy()
    plain &= (screen.obs["stage"] == "interphase").to_numpy()
    area = _stat(crops[plain], nuclear_area)
    assert np.median(area[edge[plain]]) < 0.8 * np.median(area[~edge[plain]])
    # more neighbours: more DAPI objects anywhere in the crop
    objects = np.array([_nuclei(c[0])[1] for c in crops[plain]])
    assert objects[edge[plain]].mean() > objects[~edge[plain]].mean() + 0.5


def test_per_well_channel_gains(screen, crops):
    gains = np.asarray(screen.uns["synthetic_screen"]["channel_gains"])[0]  # plate P1
    wells = screen.uns["synthetic_screen"]["wells"]
    channel_means = crops.mean(axis=(2, 3))
    observed = np.array(
        [np.median(channel_means[(screen.obs["well"] == w).to_numpy()], axis=0) for w in wells]
    )
    # relative to the mean over wells, per channel, observed levels follow the recorded gains
    log_obs = np.log(observed) - np.log(observed).mean(axis=0)
    log_gain = np.log(gains) - np.log(gains).mean(axis=0)
    assert np.corrcoef(log_obs.ravel(), log_gain.ravel())[0, 1] > 0.8
    assert np.ptp(log_obs, axis=0).max() > np.log(1.15)


# --- perturbation effects --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("effect", "statistic"),
    [
        ("binucleate", n_dapi_objects),
        ("micronuclei", n_dapi_objects),
        ("tubulin_aggregates", puncta_score),
        ("actin_ring", ring_score),
    ],
)
def test_novel_effects_leave_the_control_range(screen, crops, effect_of, effect, statistic):
    control = _stat(crops[_interphase_controls(screen, effect_of)], statistic)
    hit = ((effect_of == effect) & screen.obs["affected"]).to_numpy()
    assert hit.sum() >= 15
    affected = _stat(crops[hit], statistic)
    assert np.median(affected) > control.max()
    assert np.mean(affected > control.max()) > 0.7


def test_shift_effects_stay_in_the_control_range(screen, crops, effect_of):
    obs = screen.obs
    control = (effect_of == "control").to_numpy()
    arrest = (effect_of == "mitotic_arrest").to_numpy()
    mitotic = (obs["stage"] == "mitotic").to_numpy()
    assert mitotic[arrest].mean() > 2 * mitotic[control].mean()
    # the extra mitoses look like control mitoses
    dapi_max = crops[:, 0].max(axis=(1, 2))
    lo, hi = np.quantile(dapi_max[control & mitotic], [0.0, 1.0])
    assert (
        np.mean((dapi_max[arrest & mitotic] >= lo * 0.9) & (dapi_max[arrest & mitotic] <= hi * 1.1))
        > 0.9
    )

    interphase_controls = _interphase_controls(screen, effect_of)
    ctrl_area = _stat(crops[interphase_controls], nuclear_area)
    large = ((effect_of == "large_cells") & obs["affected"]).to_numpy()
    area = _stat(crops[large], nuclear_area)
    assert np.median(area) > 1.2 * np.median(ctrl_area)
    assert np.quantile(ctrl_area, 0.05) < np.median(area) < np.quantile(ctrl_area, 0.95)
    assert np.mean((area >= ctrl_area.min()) & (area <= ctrl_area.max())) > 0.8


def test_affected_follows_efficiency_and_penetrance(screen):
    obs = screen.obs
    truth, guides = screen.uns["ground_truth"], screen.uns["guide_truth"]
    effective = (
        obs["gene_symbol"]
        .astype(str)
        .map(truth["effect"])
        .isin(["large_cells", "elongated", "dna_damage", "g2_arrest", "binucleate", "actin_ring"])
    )
    sub = obs.loc[effective & (obs["stage"] == "interphase")]
    expected = (
        guides.loc[sub["sgRNA"].astype(str), "efficiency"].to_numpy()
        * truth.loc[sub["gene_symbol"].astype(str), "penetrance"].to_numpy()
    )
    assert sub["affected"].mean() == pytest.approx(expected.mean(), abs=0.08)
    assert 0 < sub["affected"].mean() < 1


def test_hard_screen_has_weaker_effects_and_stronger_artefacts():
    standard = synthetic_screen(n_cells=1500, seed=3)
    hard = synthetic_screen(n_cells=1500, seed=3, difficulty="hard")
    truth_s, truth_h = standard.uns["ground_truth"], hard.uns["ground_truth"]
    assert (truth_h["effect"] == "none").mean() == pytest.approx(0.5, abs=0.02)
    assert (truth_s["effect"] == "none").mean() == pytest.approx(0.3, abs=0.02)
    with_effect = truth_h["effect"] != "none"
    assert truth_h.loc[with_effect, "penetrance"].max() <= 0.6 * 0.95 + 1e-9
    assert truth_h.loc[with_effect, "strength"].max() <= 0.6 + 1e-9
    # per-well gains spread three times as far (log-normal sd 0.45 instead of 0.15)
    assert hard.uns["synthetic_screen"]["gain_log_sd"] == pytest.approx(0.45)
    assert standard.uns["synthetic_screen"]["gain_log_sd"] == pytest.approx(0.15)
    assert np.log(hard.uns["synthetic_screen"]["channel_gains"]).std() > 0.2
    assert hard.uns["synthetic_screen"]["vignetting"] == pytest.approx(0.9)
    assert hard.uns["synthetic_screen"]["difficulty"] == "hard"
    # fewer affected cells among the cells of genes with an effect
    affected = {
        name: a.obs["affected"][a.obs["effect_kind"].isin(["shift", "novel"])].mean()
        for name, a in (("standard", standard), ("hard", hard))
    }
    assert affected["hard"] < 0.75 * affected["standard"]


# --- persistence ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_ground_truth_survives_writing(screen, tmp_path, fmt):
    target = tmp_path / f"screen.{fmt}"
    if fmt == "h5ad":
        screen.write_h5ad(target)
        back = ad.read_h5ad(target)
    else:
        screen.write_zarr(target)
        back = ad.read_zarr(target)
    for key in ("ground_truth", "guide_truth"):
        pd.testing.assert_frame_equal(
            back.uns[key], screen.uns[key], check_dtype=False, check_index_type=False
        )
    info = back.uns["synthetic_screen"]
    assert list(info["tile_grid"]) == [6, 6] and list(info["channel_names"]) == CHANNELS
    complexes = screen.uns["synthetic_screen"]["complexes"]
    assert {k: list(v) for k, v in info["complexes"].items()} == complexes
    pd.testing.assert_frame_equal(back.obs, screen.obs, check_dtype=False)
    np.testing.assert_array_equal(get_crops(back, [3, 4]), get_crops(screen, [3, 4]))


# --- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_cells": 50}, ValueError, "every guide needs at least one cell"),
        ({"control_fraction": 0.0}, ValueError, "strictly between 0 and 1"),
        ({"control_fraction": 1.0}, ValueError, "strictly between 0 and 1"),
        ({"crop_size": 16}, ValueError, "at least 32"),
        ({"n_genes": 0}, ValueError, "`n_genes` must be an integer >= 1"),
        ({"seed": -1}, ValueError, "`seed` must be an integer >= 0"),
        ({"tile_grid": (6, 0)}, ValueError, "two positive integers"),
        ({"n_wells": 400}, ValueError, "at most 384"),
        ({"batch_size": 0}, ValueError, "`batch_size`"),
        ({"chunk_cells": 0}, ValueError, "`chunk_cells`"),
        ({"difficulty": "easy"}, ValueError, "`difficulty` must be one of"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        synthetic_screen(**{"n_cells": 500, "n_genes": 10, **kwargs})
