"""``mcvi-ops train --features``, ``embed`` and ``evaluate`` on a cells x features table."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from mcvi_ops.cli import main

N_FEATURES = 30


def _table(n: int = 600, seed: int = 0) -> ad.AnnData:
    """Cells x features with gene effects, well offsets and a field-of-view distance."""
    rng = np.random.default_rng(seed)
    genes = np.array(
        ["nontargeting"] * (n // 3) + [f"G{i}" for i in rng.integers(0, 6, n - n // 3)]
    )
    well = rng.choice(["A1", "A2"], n)
    effect = {f"G{i}": rng.normal(0, 1.5, N_FEATURES) for i in range(6)}
    x = rng.normal(size=(n, N_FEATURES)) + np.stack(
        [effect.get(g, np.zeros(N_FEATURES)) for g in genes]
    )
    x += np.where(well == "A2", 3.0, 0.0)[:, None]
    obs = pd.DataFrame(
        {"gene_symbol": genes, "batch": well, "fov_distance": rng.random(n)},
        index=[f"cell{i}" for i in range(n)],
    )
    var = pd.DataFrame(index=[f"Cells_Feature_{j}" for j in range(N_FEATURES)])
    return ad.AnnData(x.astype(np.float32), obs=obs, var=var)


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(args)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def table(tmp_path) -> Path:
    path = tmp_path / "features.h5ad"
    _table().write_h5ad(path)
    return path


def test_train_embed_evaluate_features(table, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written outside --out
    train = tmp_path / "train"
    args = ["train", str(table), "--features", "--out", str(train), "--batch-key", "batch"]
    args += ["--covariates", "fov_distance", "--max-epochs", "2", "--quiet"]
    status, out, err = _run([*args, "--accelerator", "cpu"], capsys)
    assert status == 0, err[-2000:]
    assert "Trained FeatureMCVAE for 2 epochs" in out
    assert "X_fmcvae_salient, X_fmcvae_background, X_fmcvae" in out
    assert not (train / "checkpoints").exists() or not any((train / "checkpoints").iterdir())
    record = json.loads((train / "run.json").read_text())
    assert record["status"] == "finished"
    assert record["options"]["model"] == "FeatureMCVAE"
    assert record["options"]["covariates"] == ["fov_distance"]
    trained = ad.read_h5ad(train / "screen.h5ad")
    assert trained.obsm["X_fmcvae"].shape == (trained.n_obs, 64)
    assert "X_mcvae" not in trained.obsm

    # embed picks the model class from the saved registry, and reads no crop link
    embedded = tmp_path / "embedded.h5ad"
    status, out, err = _run(
        ["embed", str(train / "model"), str(table), "--out", str(embedded)], capsys
    )
    assert status == 0, err[-2000:]
    again = ad.read_h5ad(embedded)
    np.testing.assert_allclose(again.obsm["X_fmcvae"], trained.obsm["X_fmcvae"], atol=1e-5)

    # evaluate finds the feature model's embeddings without --use-rep
    gmt = tmp_path / "complexes.gmt"
    gmt.write_text("c1\tx\tG0\tG1\tG2\nc2\tx\tG3\tG4\tG5\n")
    report = tmp_path / "eval"
    args = ["evaluate", str(embedded), "--out", str(report), "--relationships", str(gmt)]
    status, out, err = _run([*args, "--umap-cells", "0", "--min-pairs", "1"], capsys)
    assert status == 0, err[-2000:]
    scores = pd.read_csv(report / "known_relationships.csv")
    assert set(scores["representation"]) == {"X_fmcvae_salient", "X_fmcvae_background", "X_fmcvae"}

    # a finished feature run: --resume is refused with the flag that works
    status, _, err = _run(
        [*args[:0], "train", str(table), "--features", "--out", str(train), "--resume"], capsys
    )
    assert status == 2
    assert "--overwrite" in err


def test_feature_options_need_features(table, tmp_path, capsys):
    status, _, err = _run(
        ["train", str(table), "--out", str(tmp_path / "o"), "--covariates", "fov_distance"], capsys
    )
    assert status == 2
    assert "--features" in err
    status, _, err = _run(
        ["train", str(table), "--features", "--out", str(tmp_path / "o"), "--covariates", "nope"],
        capsys,
    )
    assert status == 2
    assert "--covariates" in err and "nope" in err
    assert not (tmp_path / "o" / "model").exists()
