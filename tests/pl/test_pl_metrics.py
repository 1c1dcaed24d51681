import anndata as ad
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

import mcvi_ops.metrics as me
import mcvi_ops.pl as mpl


def _genes():
    rng = np.random.default_rng(0)
    names = [f"G{i}" for i in range(40)]
    genes = ad.AnnData(obs=pd.DataFrame(index=names))
    genes.obsm["X_mcvae_salient"] = rng.normal(size=(40, 4))
    genes.obsm["b"] = rng.normal(size=(40, 4))
    sets = {f"c{k}": names[k * 5 : k * 5 + 5] for k in range(8)}
    me.known_relationships(genes, use_rep=["X_mcvae_salient", "b"], relationships={"toy": sets})
    return genes


def _leakage():
    # the salient AUROC of batch is below chance by as much as the background one is above
    return pd.DataFrame(
        {
            "representation": ["X_mcvae_salient"] * 2 + ["X_mcvae_background"] * 2,
            "covariate": ["batch", "fov_position"] * 2,
            "macro_f1": [0.3, 0.5, 0.9, 0.6],
            "auroc": [0.34, 0.5, 0.66, np.nan],
            "f1_chance": [0.33, 0.5, 0.33, 0.5],
            "auroc_chance": [0.5] * 4,
        }
    )


def _confusion():
    groups = ["x", "y"]
    return {"confusion": pd.DataFrame([[0.75, 0.25], [0.0, 1.0]], index=groups, columns=groups)}


def _difference():
    groups = ["x", "y"]
    return me.recall_difference(
        {"recall": pd.DataFrame({"recall": [0.75, 1.0]}, index=groups)},
        {"recall": pd.DataFrame({"recall": [0.5, 1.0]}, index=groups)},
    )


def _methods():
    rows = []
    for seed in range(3):
        for method, ap, m_ap in [
            ("X_mcvae", 0.4, 0.5),
            ("X_vae", 0.3, 0.45),
            ("cellprofiler", 0.35, 0.4),
        ]:
            rows.append((method, "same-complex AP", ap + 0.01 * seed, 0.1))
            rows.append((method, "mAP", m_ap + 0.01 * seed, 0.25))
    return pd.DataFrame(rows, columns=["method", "metric", "value", "chance"])


PLOTS = {
    "precision_recall": lambda **kw: mpl.precision_recall(_genes(), **kw),
    "technical_covariates": lambda **kw: mpl.technical_covariates(_leakage(), **kw),
    "confusion_matrix": lambda **kw: mpl.confusion_matrix(_confusion(), **kw),
    "recall_difference": lambda **kw: mpl.recall_difference(_difference(), **kw),
    "method_comparison": lambda **kw: mpl.method_comparison(_methods(), **kw),
}


@pytest.mark.parametrize("name", PLOTS)
def test_show_save_ax_return_fig(name, tmp_path, saves, shows, state):
    import matplotlib.pyplot as plt

    plot = PLOTS[name]
    fig = plot(return_fig=True)
    assert isinstance(fig, Figure)
    assert not shows
    assert plot() is None  # shown, as in scanpy
    assert len(shows) == 1
    _, axs = plt.subplots(1, 2, layout="constrained")
    assert plot(ax=axs[1]) is axs[1]
    assert not shows[1:]  # drawing into a given axes does not show
    assert axs[1].has_data()
    assert not axs[0].has_data()
    path = tmp_path / f"{name}.png"
    fig = plot(save=path, return_fig=True)
    assert path.is_file()
    assert path.stat().st_size > 0
    assert len(saves) == 1
    assert saves[0]["state"] == state(fig)  # saved once, after everything was drawn
    with pytest.raises(ValueError, match="suffix"):
        plot(save=tmp_path / "no_suffix", show=False)


def test_precision_recall_labels_and_errors():
    genes = _genes()
    ax = mpl.precision_recall(genes, source="toy", show=False)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("mcVAE salient (AP 0.")
    assert labels[1].startswith("b (AP ")
    assert labels[2] == "random ranking"
    assert ax.get_title() == "toy"
    ax = mpl.precision_recall({"run1": genes}, representations=["b"], show=False)
    assert len(ax.get_lines()) == 2
    assert ax.get_legend().get_texts()[0].get_text().startswith("run1: b")
    with pytest.raises(KeyError, match="known_relationships"):
        mpl.precision_recall(ad.AnnData(obs=pd.DataFrame(index=genes.obs_names)))
    with pytest.raises(KeyError, match="Pass one of them as `source`"):
        mpl.precision_recall(genes, source="corum")


def _bars(ax):
    return [p for p in ax.patches if p.get_width() > 0 and p.get_height() != 0]


def test_technical_covariates_judges_distance_from_chance():
    ax = mpl.technical_covariates(_leakage(), show=False)
    heights = [p.get_height() for p in ax.patches]
    # bars per representation: salient (batch, fov), background (batch, fov)
    assert heights[0] == pytest.approx(heights[2])  # AUROC 0.34 as far from chance as 0.66
    assert heights[0] == pytest.approx(0.16)
    assert ax.patches[0].get_hatch()  # below chance is marked
    assert not ax.patches[2].get_hatch()
    assert "lower is better" in ax.get_ylabel()
    assert "chance" in ax.get_ylabel()
    texts = [t.get_text() for t in ax.texts]
    assert "0.34" in texts
    assert "n/a" in texts  # the NaN AUROC
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["mcVAE salient", "mcVAE background", "below chance"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["batch", "field-of-view position"]

    ax = mpl.technical_covariates(_leakage(), kind="score", show=False)
    below, above = ax.patches[0], ax.patches[2]
    # bars start at chance: the below-chance one hangs down to its score
    assert below.get_y() + below.get_height() == pytest.approx(0.34)
    assert below.get_y() == pytest.approx(0.5)
    assert above.get_y() + above.get_height() == pytest.approx(0.66)
    assert "closer to chance is better" in ax.get_ylabel()
    assert "lower is better" not in ax.get_ylabel()
    assert "chance" in [t.get_text() for t in ax.get_legend().get_texts()]

    with pytest.raises(ValueError, match="'distance' or 'score'"):
        mpl.technical_covariates(_leakage(), kind="lower")
    with pytest.raises(ValueError, match="lacks the columns"):
        mpl.technical_covariates(_leakage().drop(columns="auroc_chance"))


def test_technical_covariates_from_anndata():
    rng = np.random.default_rng(0)
    n = 200
    obs = pd.DataFrame(
        {
            "gene_symbol": ["nontargeting"] * n,
            "batch": np.resize(["w1", "w2"], n),
        },
        index=[f"c{i}" for i in range(n)],
    )
    adata = ad.AnnData(obs=obs)
    adata.obsm["X_mcvae_salient"] = rng.normal(size=(n, 3))
    me.technical_covariates(adata, use_rep="X_mcvae_salient", covariates=["batch"], within_batch=[])
    ax = mpl.technical_covariates(adata, metric="macro_f1", show=False)
    assert len(ax.patches) == 1
    assert "macro-F1" in ax.get_ylabel()


def test_confusion_and_difference_labels():
    ax = mpl.confusion_matrix(_confusion(), annotate=True, title="function", show=False)
    assert ax.get_xlabel() == "predicted group"
    assert ax.get_title() == "function"
    assert "0.75" in [t.get_text() for t in ax.texts]
    with pytest.raises(TypeError, match="function_classification"):
        mpl.confusion_matrix({"recall": None})
    ax = mpl.recall_difference(_difference(), show=False)
    assert "salient - background" in ax.get_xlabel()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["better from salient", "better from background"]


def test_method_comparison_bars_chance_and_errors():
    ax = mpl.method_comparison(_methods(), show=False)
    bars = ax.patches
    assert len(bars) == 3 * 2  # methods x metrics
    # means over the 3 repeats, in the table's method order
    assert bars[0].get_height() == pytest.approx(0.41)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["same-complex AP", "mAP"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [
        "mcVAE salient + background",
        "VAE",
        "CellProfiler features",
        "chance / baseline",
    ]
    chance = [c for c in ax.collections if c.get_linestyle()[0][1] is not None]
    levels = sorted(seg[0][1] for c in chance for seg in c.get_segments())
    assert levels == pytest.approx([0.1, 0.25])
    assert any("SD" in t.get_text() for t in ax.texts)
    fig = ax.figure
    fig.canvas.draw()
    assert not ax.get_legend().get_window_extent().overlaps(ax.get_window_extent())

    synthetic = pd.DataFrame(
        {
            "representation": ["X_mcvae", "X_vae", "X_mcvae"],
            "metric": ["complex_average_precision", "complex_average_precision", "novelty_auroc"],
            "value": [0.4, 0.3, 0.8],
        }
    )
    ax = mpl.method_comparison(
        synthetic,
        metrics=["same-complex AP", "novelty_auroc"],
        methods=["X_vae", "X_mcvae"],
        method_key="representation",
        show=False,
    )
    assert [t.get_text() for t in ax.get_xticklabels()] == ["same-complex AP", "novelty AUROC"]
    heights = [p.get_height() for p in ax.patches]
    assert heights[0] == pytest.approx(0.3)
    assert np.isnan(heights[1])  # the VAE has no novelty AUROC: no bar, marked n/a
    assert "n/a" in [t.get_text() for t in ax.texts]
    with pytest.raises(ValueError, match="method_key='representation'"):
        mpl.method_comparison(synthetic)
    with pytest.raises(ValueError, match="None of the requested metrics"):
        mpl.method_comparison(synthetic, metrics=["mAP"], method_key="representation")
    # the default metrics match the synthetic screen's same-complex AP by its label
    ax = mpl.method_comparison(synthetic, method_key="representation", show=False)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["same-complex AP"]


def test_method_comparison_chance_per_bar_when_methods_differ():
    table = pd.DataFrame(
        {
            "method": ["X_mcvae", "X_vae"],
            "metric": ["mAP", "mAP"],
            "value": [0.5, 0.4],
            "chance": [0.2, 0.3],
        }
    )
    ax = mpl.method_comparison(table, show=False)
    chance = [c for c in ax.collections if c.get_linestyle()[0][1] is not None]
    segments = [seg for c in chance for seg in c.get_segments()]
    # one dashed line over each bar, at that method's chance level and spanning its bar
    assert sorted(seg[0][1] for seg in segments) == pytest.approx([0.2, 0.3])
    for bar, level in zip(ax.patches, [0.2, 0.3], strict=True):
        seg = next(s for s in segments if s[0][1] == pytest.approx(level))
        assert [seg[0][0], seg[1][0]] == pytest.approx([bar.get_x(), bar.get_x() + bar.get_width()])
