from __future__ import annotations

import anndata as ad
import pandas as pd
import pytest

from mcvi_ops.cli import main


def test_simulate_command(tmp_path, capsys):
    assert main(["simulate", "--out", str(tmp_path), "--n-cells", "300", "--n-genes", "4"]) == 0
    adata = ad.read_h5ad(tmp_path / "screen.h5ad")
    assert adata.n_obs == 300
    assert "Simulated 300 cells" in capsys.readouterr().out
    # the hint names the command's flag, not the Python keyword
    assert main(["simulate", "--out", str(tmp_path), "--n-cells", "300", "--n-genes", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mcvi-ops simulate: error:") and len(err.strip().splitlines()) == 1
    assert "pass --overwrite to replace it" in err and "overwrite=True" not in err
    with pytest.raises(FileExistsError, match="overwrite"):
        main(["simulate", "--out", str(tmp_path), "--n-cells", "300", "--n-genes", "4", "--debug"])


@pytest.mark.slow  # about a minute on 2 CPU cores; train/embed/evaluate are tested faster
def test_demo_end_to_end(tmp_path, capsys):
    args = ["demo", "--out", str(tmp_path), "--n-cells", "400", "--n-genes", "6"]
    args += ["--crop-size", "32", "--max-epochs", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Trained MCVAE for 1 epochs" in out
    adata = ad.read_h5ad(tmp_path / "screen.h5ad")
    for key in ("X_mcvae_salient", "X_mcvae_background", "X_mcvae"):
        assert adata.obsm[key].shape[0] == 400
    for color in ("well", "fov_position", "effect_kind"):
        assert (tmp_path / f"umap_{color}.png").stat().st_size > 10_000
    scores = pd.read_csv(tmp_path / "scores.csv", index_col=0)
    assert {"well_macro_f1", "complex_average_precision", "novelty_auroc"} <= set(scores.columns)
    assert (tmp_path / "model" / "model.pt").exists()
