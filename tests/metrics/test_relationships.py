import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score
from sklearn.metrics.pairwise import cosine_similarity

from mcvi_ops.metrics import known_relationships
from mcvi_ops.metrics._relationships import condensed_cosine


def _angles(degrees, names):
    t = np.deg2rad(degrees)
    return ad.AnnData(
        np.c_[np.cos(t), np.sin(t)].astype(np.float32),
        obs=pd.DataFrame(index=names),
    )


def test_hand_computed():
    # similarities: AB .766, BC .5, AC -.174, CD -.342, AD -.866, BD -.985
    genes = _angles([0, 40, 100, 210], ["A", "B", "C", "D"])
    pairs = pd.DataFrame({"entity1": ["A", "C", "A"], "entity2": ["B", "D", "E"]})  # E absent
    df = known_relationships(genes, relationships={"toy": pairs}, percentiles=(20,), min_pairs=2)
    res = df.set_index("metric")
    # ranking AB(+), BC, AC, CD(+), AD, BD -> AP = (1/1 + 2/4) / 2
    assert res.loc["average_precision", "value"] == pytest.approx(0.75)
    assert res.loc["average_precision", "baseline"] == pytest.approx(2 / 6)
    # quantiles 0.2 / 0.8 of the 6 similarities are AD and BC: tails = {BD, AD, BC, AB}
    assert res.loc["recall_20", "value"] == pytest.approx(0.5)
    assert res.loc["recall_20", "baseline"] == pytest.approx(4 / 6)
    # top tail {AB, BC}: AB is annotated; bottom tail {BD, AD}: CD is not in it
    assert res.loc["recall_top_20", "value"] == pytest.approx(0.5)
    assert res.loc["recall_top_20", "baseline"] == pytest.approx(2 / 6)
    assert res.loc["recall_bottom_20", "value"] == pytest.approx(0.0)
    assert res.loc["recall_bottom_20", "baseline"] == pytest.approx(2 / 6)
    assert (res["n_pairs"] == 2).all()
    assert (res["n_candidate_pairs"] == 6).all()
    stored = genes.uns["known_relationships"]["X"]
    assert set(stored["curves"]["toy"]) == {"recall", "precision", "baseline"}


def test_condensed_blocks_match_pdist():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(57, 4))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    iu = np.triu_indices(57, k=1)
    ref = cosine_similarity(x)[iu]
    for block in (1, 100, 1 << 22):
        np.testing.assert_allclose(condensed_cosine(xn, block_elements=block), ref, atol=1e-6)


def test_recall_and_ap_match_brute_force():
    rng = np.random.default_rng(1)
    n = 80
    names = np.array([f"G{i}" for i in range(n)])
    x = rng.normal(size=(n, 6))
    x[:20] += 2 * rng.normal(size=(1, 6))  # a "complex" sharing a direction
    genes = ad.AnnData(obs=pd.DataFrame(index=names))
    genes.obsm["X_emb"] = x
    pos = {tuple(sorted(rng.choice(20, 2, replace=False))) for _ in range(40)}
    pos |= {tuple(sorted(rng.choice(np.arange(10, 60), 2, replace=False))) for _ in range(30)}
    pairs = pd.DataFrame([(names[i], names[j]) for i, j in pos], columns=["entity1", "entity2"])
    df = known_relationships(genes, use_rep="X_emb", relationships={"s": pairs}).set_index("metric")

    sim = cosine_similarity(x)
    iu = np.triu_indices(n, k=1)
    all_sims = sim[iu]
    pair_sims = np.array([sim[i, j] for i, j in pos])
    for p in (5, 10):
        lo, hi = np.quantile(all_sims, [p / 100, 1 - p / 100])
        expected = np.mean((pair_sims <= lo) | (pair_sims >= hi))
        assert df.loc[f"recall_{p}", "value"] == pytest.approx(expected)
        assert df.loc[f"recall_{p}", "baseline"] == pytest.approx(2 * p / 100, abs=2 / iu[0].size)
        assert df.loc[f"recall_top_{p}", "value"] == pytest.approx(np.mean(pair_sims >= hi))
        assert df.loc[f"recall_bottom_{p}", "value"] == pytest.approx(np.mean(pair_sims <= lo))
        assert df.loc[f"recall_top_{p}", "baseline"] == pytest.approx(p / 100, abs=1 / iu[0].size)
        # EFAAR's compute_recall: percentage ranks of the pair similarities among all pairs
        null = np.sort(all_sims)
        rank_left = np.searchsorted(null, pair_sims, side="left") / null.size
        rank_right = np.searchsorted(null, pair_sims, side="right") / null.size
        efaar = np.mean((rank_right <= p / 100) | (rank_left >= 1 - p / 100))
        assert df.loc[f"recall_{p}", "value"] == pytest.approx(efaar, abs=2 / len(pos))
    annotated = np.unique(np.array(list(pos)))
    sub = sim[np.ix_(annotated, annotated)]
    siu = np.triu_indices(annotated.size, k=1)
    pos_set = set(pos)
    labels = np.array([(annotated[i], annotated[j]) in pos_set for i, j in zip(*siu, strict=True)])
    assert df.loc["average_precision", "value"] == pytest.approx(
        average_precision_score(labels, sub[siu]), abs=1e-6
    )
    assert df.loc["average_precision", "baseline"] == pytest.approx(labels.mean())


def test_controls_and_several_representations():
    rng = np.random.default_rng(2)
    names = [f"G{i}" for i in range(30)] + ["nontargeting"]
    genes = ad.AnnData(obs=pd.DataFrame(index=names))
    genes.obsm["a"] = rng.normal(size=(31, 3))
    genes.obsm["b"] = rng.normal(size=(31, 5))
    sets = {f"c{k}": [f"G{i}" for i in range(k * 5, k * 5 + 5)] for k in range(6)}
    df = known_relationships(genes, use_rep=["a", "b"], relationships=sets)
    assert set(df["representation"]) == {"a", "b"}
    assert (df["n_genes"] == 30).all()
    assert set(genes.uns["known_relationships"]) == {"a", "b"}


def test_errors():
    genes = _angles([0, 40, 100, 210], ["A", "B", "C", "D"])
    with pytest.raises(ValueError, match="0 of its 2 genes are in the embedding"):
        known_relationships(genes, relationships=pd.DataFrame({"entity1": ["X"], "entity2": ["Y"]}))
    with pytest.raises(ValueError, match="fewer than min_pairs=10"):
        known_relationships(genes, relationships={"s": {"A", "B", "C"}})
    with pytest.raises(KeyError, match=r"Did not find \.obsm\['X_mcvae'\]"):
        known_relationships(genes, use_rep="X_mcvae", relationships={"s": {"A", "B"}})
    with pytest.warns(UserWarning, match="not unique"):
        dup = ad.concat([genes, genes])
    with pytest.raises(ValueError, match="unique"):
        known_relationships(dup, relationships={"s": {"A", "B"}})
