import anndata as ad
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

import mcvi_ops.pl as mpl
from mcvi_ops.pl._utils import CONTROL_COLOR, OTHER_COLOR, readable

REPS = ("X_mcvae_salient", "X_mcvae_background")


def _cells(n=300, n_genes=2, *, umaps=True, seed=0):
    """Cells of ``n_genes`` genes and nontargeting controls, with random embeddings and UMAPs."""
    rng = np.random.default_rng(seed)
    genes = [f"GENE{i:03d}" for i in range(n_genes)] + ["nontargeting"]
    # uneven group sizes, so that the largest groups are well defined
    weights = np.linspace(2.0, 1.0, len(genes))
    weights[-1] = 4.0
    obs = pd.DataFrame(
        {"gene_symbol": pd.Categorical(rng.choice(genes, n, p=weights / weights.sum()))},
        index=[f"c{i}" for i in range(n)],
    )
    adata = ad.AnnData(obs=obs)
    for rep in REPS:
        adata.obsm[rep] = rng.normal(size=(n, 3))
        if umaps:
            adata.obsm[f"X_umap_{rep}"] = adata.obsm[rep][:, :2]
    adata.obsm["X_umap"] = np.zeros((n, 2))
    return adata


def test_reuses_stored_umaps_into_given_axes(shows):
    import matplotlib.pyplot as plt

    adata = _cells()
    _, axs = plt.subplots(1, 2)
    out = mpl.salient_background(adata, color="gene_symbol", axs=axs)
    assert list(out) == list(axs)
    assert not shows  # the caller composes the figure: no show by default
    assert [ax.get_title() for ax in out] == ["mcVAE salient", "mcVAE background"]
    assert out[0].get_xlabel() == "UMAP1"
    with pytest.raises(KeyError, match="X_vae"):
        mpl.salient_background(adata, reps=["X_vae"])
    with pytest.raises(ValueError, match="one axis per rep"):
        mpl.salient_background(adata, axs=axs[:1])


def test_show_return_fig_and_single_ax(shows):
    import matplotlib.pyplot as plt

    adata = _cells()
    assert mpl.salient_background(adata, color="gene_symbol") is None
    assert len(shows) == 1
    fig = mpl.salient_background(adata, color="gene_symbol", return_fig=True)
    assert isinstance(fig, Figure)
    assert len(shows) == 1
    assert sum(ax.get_title() != "" for ax in fig.axes) == 2
    _, ax = plt.subplots()
    out = mpl.salient_background(adata, reps=["X_mcvae_salient"], ax=ax, title="s")
    assert out == [ax]
    assert ax.get_title() == "s"
    with pytest.raises(ValueError, match="pass `axs`"):
        mpl.salient_background(adata, ax=ax)


def test_save_writes_the_finished_figure_once(tmp_path, saves, state):
    adata = _cells(n_genes=30)
    path = tmp_path / "sub" / "umaps.png"
    fig = mpl.salient_background(adata, color="gene_symbol", save=path, return_fig=True)
    assert path.is_file()
    assert path.stat().st_size > 0
    assert len(saves) == 1
    assert saves[0]["figure"] is fig
    # both panels were drawn and the legend placed before the one save
    assert saves[0]["state"] == state(fig)
    panels = [ax for ax in fig.axes if ax.collections]
    assert len(panels) == 2
    assert panels[-1].get_legend() is not None
    with pytest.raises(ValueError, match="suffix"):
        mpl.salient_background(adata, save=tmp_path / "umaps")


def test_many_categories_get_a_short_legend_outside_all_panels():
    adata = _cells(n=1500, n_genes=60)
    fig = mpl.salient_background(adata, color="gene_symbol", return_fig=True)
    fig.canvas.draw()
    panels = [ax for ax in fig.axes if ax.collections]
    legend = panels[-1].get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert len(labels) == 20 + 2
    assert "other (40 smaller categories)" in labels
    assert "nontargeting (control)" in labels
    assert legend.get_title().get_text() == "perturbed gene"
    # the 20 kept are the largest groups
    counts = adata.obs["gene_symbol"].value_counts().drop("nontargeting")
    assert set(labels[:20]) == set(counts.index[:20])
    box = legend.get_window_extent()
    for ax in panels:
        assert not box.overlaps(ax.get_window_extent())
    assert box.x0 >= panels[-1].get_window_extent().x1
    assert box.x1 <= fig.bbox.x1 + 1  # inside the figure, not clipped


def test_controls_are_light_grey_and_drawn_first():
    adata = _cells(n=400, n_genes=25)
    fig = mpl.salient_background(
        adata, color="gene_symbol", reps=["X_mcvae_salient"], return_fig=True
    )
    ax = next(ax for ax in fig.axes if ax.collections)
    colors = ax.collections[0].get_facecolors()
    n_control = int((adata.obs["gene_symbol"] == "nontargeting").sum())
    grey = np.array(to_rgba(CONTROL_COLOR))
    assert np.allclose(colors[:n_control], grey)
    assert not np.isclose(colors[n_control:], grey).all(axis=1).any()
    other = np.array(to_rgba(OTHER_COLOR))
    n_other = np.isclose(colors, other).all(axis=1).sum()
    assert n_other > 0  # 25 genes > 20: the smallest 5 are folded into "other"
    # folded cells come after the controls and before all coloured genes
    assert np.isclose(colors[n_control : n_control + n_other], other).all()
    no_cap = mpl.salient_background(
        adata, color="gene_symbol", reps=["X_mcvae_salient"], max_categories=None, return_fig=True
    )
    labels = [t.get_text() for t in no_cap.axes[0].get_legend().get_texts()]
    assert len(labels) == 26
    assert not any(label.startswith("other") for label in labels)


def test_missing_values_are_labelled_not_annotated():
    adata = _cells()
    well = pd.Series(np.resize(["A1", "A2", "B1"], adata.n_obs), index=adata.obs_names)
    well.iloc[:7] = None
    adata.obs["well"] = well.astype("category")
    fig = mpl.salient_background(adata, color="well", return_fig=True)
    legend = next(ax.get_legend() for ax in fig.axes if ax.get_legend())
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["A1", "A2", "B1", "not annotated (7 cells)"]
    assert "NA" not in labels


def test_continuous_colour_gets_a_labelled_colorbar():
    adata = _cells()
    adata.obs["cell_area"] = np.linspace(0, 1, adata.n_obs)
    fig = mpl.salient_background(adata, color="cell_area", return_fig=True)
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert labels.count("cell area") == 2
    with pytest.raises(ValueError, match="legend_loc"):
        mpl.salient_background(adata, color="cell_area", legend_loc="left", show=False)


@pytest.mark.parametrize(
    ("key", "label"),
    [
        ("X_mcvae_salient", "mcVAE salient"),
        ("X_mcvae_background", "mcVAE background"),
        ("X_pca_pixels", "PCA of pixels"),
        ("fov_position", "field-of-view position"),
        ("X_my_embedding", "my embedding"),
        ("cvae_salient", "cVAE salient"),
        ("X_scvi_latent", "scvi latent"),
    ],
)
def test_readable_labels(key, label):
    assert readable(key) == label


def test_missing_umap_names_what_to_run_and_nothing_is_computed():
    adata = _cells(umaps=False)
    with pytest.raises(KeyError, match=r"mcvi_ops\.tl\.umaps\(adata, use_rep=\['X_mcvae_salient'"):
        mpl.salient_background(adata, show=False)
    with pytest.raises(
        KeyError, match=r"sc\.tl\.umap\(adata, neighbors_key='neighbors_X_mcvae_salient'"
    ):
        mpl.salient_background(adata, show=False)
    assert not [k for k in adata.obsm if k.startswith("X_umap_")]
    assert not adata.uns
    with pytest.raises(TypeError, match=r"no longer computes them.*mcvi_ops\.tl\.umaps"):
        mpl.salient_background(adata, n_neighbors=5, show=False)


def test_scanpy_umap_of_one_representation_is_used():
    adata = _cells(umaps=False)
    adata.obsm["X_umap"] = adata.obsm["X_mcvae_salient"][:, :2]
    adata.uns["neighbors"] = {"params": {"use_rep": "X_mcvae_salient"}}
    axs = mpl.salient_background(adata, reps=["X_mcvae_salient"], show=False)
    offsets = axs[0].collections[0].get_offsets()
    np.testing.assert_allclose(np.sort(offsets[:, 0]), np.sort(adata.obsm["X_umap"][:, 0]))
    with pytest.raises(KeyError, match="X_umap_X_mcvae_background"):
        mpl.salient_background(adata, reps=["X_mcvae_background"], show=False)
