import anndata as ad
import numpy as np
import pandas as pd
import pytest

import mcvi_ops.metrics as me
import mcvi_ops.pl as mpl


@pytest.fixture(autouse=True)
def _agg():
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")
    yield
    plt.close("all")


def test_precision_recall_several_representations():
    rng = np.random.default_rng(0)
    names = [f"G{i}" for i in range(40)]
    genes = ad.AnnData(obs=pd.DataFrame(index=names))
    genes.obsm["a"] = rng.normal(size=(40, 4))
    genes.obsm["b"] = rng.normal(size=(40, 4))
    sets = {f"c{k}": names[k * 5 : k * 5 + 5] for k in range(8)}
    me.known_relationships(genes, use_rep=["a", "b"], relationships={"toy": sets})
    ax = mpl.precision_recall(genes, source="toy")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["a", "b", "random"]
    ax = mpl.precision_recall({"run1": genes}, representations=["a"])
    assert len(ax.get_lines()) == 2
    with pytest.raises(KeyError, match="known_relationships"):
        mpl.precision_recall(ad.AnnData(obs=pd.DataFrame(index=names)))


def test_covariate_confusion_and_difference_plots():
    import matplotlib.pyplot as plt

    df = pd.DataFrame(
        {
            "representation": ["s", "s", "b", "b"],
            "covariate": ["batch", "fov_position"] * 2,
            "macro_f1": [0.3, 0.5, 0.9, 0.6],
            "auroc": [0.55, 0.5, 0.99, 0.7],
            "f1_chance": [0.33, 0.5, 0.33, 0.5],
            "auroc_chance": [0.5] * 4,
        }
    )
    _, axs = plt.subplots(1, 3)
    assert mpl.technical_covariates(df, ax=axs[0]) is axs[0]
    assert len(axs[0].patches) == 4
    groups = ["x", "y"]
    result = {"confusion": pd.DataFrame([[0.75, 0.25], [0.0, 1.0]], index=groups, columns=groups)}
    assert mpl.confusion_matrix(result, annotate=True, ax=axs[1]) is axs[1]
    diff = me.recall_difference(
        {"recall": pd.DataFrame({"recall": [0.75, 1.0]}, index=groups)},
        {"recall": pd.DataFrame({"recall": [0.5, 1.0]}, index=groups)},
    )
    ax = mpl.recall_difference(diff, ax=axs[2])
    assert "salient - background" in ax.get_xlabel()
