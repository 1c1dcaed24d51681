"""``mcvi-ops train``, ``embed`` and ``evaluate`` on real images, and their one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from mcvi_ops.cli import build_parser, cli_wording, main

RELATIONSHIPS = Path(__file__).parents[1] / "data" / "relationships"
# six genes that form a clique in the HuMAP subset, and two more genes of that file
GENES = ["RSL1D1", "RRP12", "STAU1", "SKIV2L", "RPL7L1", "PAK1IP1", "RPL17", "RRP15"]


def run_cli(args: list[str], *, shell: bool, capsys) -> tuple[int, str, str]:
    """Run ``mcvi-ops ARGS`` in a new process (shell) or in this one; return status and output."""
    if shell:
        done = subprocess.run(
            [sys.executable, "-m", "mcvi_ops.cli", *args],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        return done.returncode, done.stdout, done.stderr
    capsys.readouterr()
    status = main(args)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def screen(tiles, tmp_path, capsys) -> Path:
    """Real ExampleHuman tiles cropped with ``mcvi-ops crop``, with made-up perturbations.

    The ExampleHuman cells carry no perturbation: cells with the highest 30% of PH3 (mitosis
    marker) intensity at their centroid are labelled "perturbed" with one of eight HuMAP genes
    (two guides each), all others "nontargeting" (four guides). Tiles 0-1 are well A1, tile 2
    well A2, so batch and field-of-view position can be tested.
    """
    _, table, images = tiles
    folder = Path(tmp_path / "tiles")
    (folder / "A1_Tile-2.tif").rename(folder / "A2_Tile-2.tif")
    table.loc[table["tile"] == 2, "well"] = "A2"
    ph3 = [
        images[t][
            1, max(round(i) - 3, 0) : round(i) + 4, max(round(j) - 3, 0) : round(j) + 4
        ].mean()
        for t, i, j in zip(table["tile"], table["cell_i"], table["cell_j"], strict=True)
    ]
    high = np.asarray(ph3) >= np.quantile(ph3, 0.7)
    k = np.arange(len(table))
    table["gene_symbol"] = np.where(high, np.array(GENES)[k % len(GENES)], "nontargeting")
    table["sgRNA"] = [
        f"nt_{i % 4}" if g == "nontargeting" else f"{g}_{i % 2}"
        for g, i in zip(table["gene_symbol"], k // len(GENES), strict=True)
    ]
    table.drop(columns="gene_symbol_0").to_csv(tmp_path / "cells.csv", index=False)
    status = main(
        [
            "crop",
            "--tiles",
            str(folder / "{well}_Tile-{tile}.tif"),
            "--cells",
            str(tmp_path / "cells.csv"),
            "--out",
            str(tmp_path / "crop"),
            "--channel-names",
            "DNA",
            "PH3",
            "cellbody",
            "--crop-size",
            "40",
            "--resize-to",
            "32",
            "--no-align",
            "--quiet",
        ]
    )
    assert status == 0
    return tmp_path / "crop" / "cells.h5ad"


@pytest.mark.parametrize("shell", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_train_embed_evaluate(screen, tmp_path, capsys, shell, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written outside --out
    train = tmp_path / "train"
    args = ["train", str(screen), "--out", str(train), "--max-epochs", "1", "--batch-size", "32"]
    status, out, err = run_cli(
        [*args, "--accelerator", "cpu", "--quiet"], shell=shell, capsys=capsys
    )
    assert status == 0, err[-2000:]
    assert "Trained MCVAE for 1 epochs" in out
    assert (train / "model" / "model.pt").is_file()
    trained = ad.read_h5ad(train / "screen.h5ad")
    n = trained.n_obs
    assert trained.obsm["X_mcvae_salient"].shape == (n, 32)
    assert trained.obsm["X_mcvae_background"].shape == (n, 32)
    np.testing.assert_array_equal(
        trained.obsm["X_mcvae"],
        np.hstack([trained.obsm["X_mcvae_salient"], trained.obsm["X_mcvae_background"]]),
    )
    assert {"train_loss", "validation_loss"} <= set(pd.read_csv(train / "history.csv").columns)
    assert (train / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.csv", "crop", "tiles", "train"]
    if shell:  # a second epoch, continuing from the checkpoint of the first
        status, out, err = run_cli(
            [*args, "--max-epochs", "2", "--resume", "--accelerator", "cpu", "--quiet"],
            shell=True,
            capsys=capsys,
        )
        assert status == 0, err[-2000:]
        assert "Trained MCVAE for 1 more epochs (2 in all)" in out
        assert list(pd.read_csv(train / "history.csv")["epoch"]) == [0, 1]
        trained = ad.read_h5ad(train / "screen.h5ad")

    embedded = tmp_path / "embedded.h5ad"
    status, out, err = run_cli(
        ["embed", str(train / "model"), str(screen), "--out", str(embedded)],
        shell=shell,
        capsys=capsys,
    )
    assert status == 0, err[-2000:]
    again = ad.read_h5ad(embedded)
    for key in ("X_mcvae_salient", "X_mcvae_background", "X_mcvae"):
        np.testing.assert_allclose(again.obsm[key], trained.obsm[key], atol=1e-5)
    if not shell:  # new cells need no perturbation column: the encoders do not read it
        cells = ad.read_h5ad(screen)
        del cells.obs["gene_symbol"]
        cells.write_h5ad(tmp_path / "new.h5ad")
        args = ["embed", str(train / "model"), str(tmp_path / "new.h5ad"), "--out", str(embedded)]
        assert run_cli(args, shell=False, capsys=capsys)[0] == 2  # exists, no --overwrite
        assert run_cli([*args, "--overwrite"], shell=False, capsys=capsys)[0] == 0
        unlabelled = ad.read_h5ad(embedded)
        assert "gene_symbol" not in unlabelled.obs
        np.testing.assert_allclose(unlabelled.obsm["X_mcvae"], trained.obsm["X_mcvae"], atol=1e-5)
        embedded = tmp_path / "embedded_again.h5ad"
        again.write_h5ad(embedded)

    report = tmp_path / "eval"
    args = ["evaluate", str(embedded), "--out", str(report), "--tile-size", "512"]
    args += ["--relationships", str(RELATIONSHIPS / "HuMAP_subset.txt")]
    args += [str(RELATIONSHIPS / "toy_complexes.tsv")]
    status, out, err = run_cli(
        args if shell else [*args, "--umap-cells", "0"], shell=shell, capsys=capsys
    )
    assert status == 0, err[-2000:]
    assert "X_mcvae_salient on HuMAP_subset: average precision" in out
    scores = pd.read_csv(report / "known_relationships.csv")
    assert set(scores["representation"]) == {"X_mcvae_salient", "X_mcvae_background", "X_mcvae"}
    assert set(scores["source"]) == {"HuMAP_subset"}  # toy genes are not in the screen
    covariates = pd.read_csv(report / "technical_covariates.csv")
    assert set(covariates["covariate"]) == {"batch", "fov_position"}
    assert covariates["n_cells"].max() <= int((trained.obs["gene_symbol"] == "nontargeting").sum())
    text = (report / "report.md").read_text()
    assert "## Known relationships" in text and "| X_mcvae_salient | HuMAP_subset |" in text
    assert "toy_complexes.tsv" in text.split("## Skipped")[1]
    assert "well_position" in text.split("## Skipped")[1]
    pictures = {p.name for p in report.glob("*.png")}
    expected = {"precision_recall_HuMAP_subset.png", "technical_covariates.png"}
    if shell:
        expected |= {"umap_cells.png", "umap_batch.png"}
    assert pictures == expected
    assert all((report / p).stat().st_size > 5_000 for p in pictures)
    for picture in pictures:
        assert f"]({picture})" in text


def _error(args: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_errors_are_one_line_with_status_2(make_linked, tmp_path, capsys):
    adata, _ = make_linked(n=40)
    linked = tmp_path / "linked.h5ad"
    adata.write_h5ad(linked)
    ad.AnnData(obs=adata.obs[["gene_symbol"]]).write_h5ad(tmp_path / "plain.h5ad")
    out = str(tmp_path / "out")

    line = _error(["train"], capsys)
    assert line.startswith("mcvi-ops train: error: the following arguments are required")
    assert "'mcvi-ops train --help'" in line
    assert "even number" in _error(
        ["train", str(linked), "--out", out, "--batch-size", "3"], capsys
    )
    assert "invalid choice" in _error(
        ["train", str(linked), "--out", out, "--accelerator", "x"], capsys
    )
    assert "does not exist" in _error(["train", str(tmp_path / "no.h5ad"), "--out", out], capsys)
    line = _error(["train", str(tmp_path / "plain.h5ad"), "--out", out], capsys)
    assert "is not linked to crops" in line and "mcvi-ops crop" in line
    line = _error(["train", str(linked), "--out", out, "--perturbation-key", "gene"], capsys)
    assert "no obs column 'gene'" in line and "Pass --perturbation-key" in line
    line = _error(["train", str(linked), "--out", out, "--control-category", "NTC"], capsys)
    assert "never equals 'NTC'" in line and "--control-category" in line
    line = _error(["train", str(linked), "--out", out, "--batch-key", "plate"], capsys)
    assert "no obs column 'plate'" in line and "--batch-key" in line
    line = _error(["train", str(linked), "--out", out, "--resume"], capsys)
    assert "No checkpoint to resume from" in line and "without --resume" in line
    (tmp_path / "out" / "model").mkdir(parents=True)
    line = _error(["train", str(linked), "--out", out], capsys)
    assert "Pass --overwrite to replace them, or --resume" in line

    line = _error(["embed", str(tmp_path), str(linked), "--out", str(tmp_path / "e.h5ad")], capsys)
    assert "not a saved model folder" in line
    rel = str(RELATIONSHIPS / "HuMAP_subset.txt")
    line = _error(["evaluate", str(linked), "--relationships", rel, "--out", out], capsys)
    assert "holds no MCVAE or FeatureMCVAE embeddings" in line and "mcvi-ops train" in line
    line = _error(["evaluate", str(linked), "--relationships", "no.txt", "--out", out], capsys)
    assert "['no.txt'] do not exist" in line
    line = _error(
        ["evaluate", str(linked), "--relationships", rel, "--out", out, "--use-rep", "X_pca"],
        capsys,
    )
    assert "no .obsm ['X_pca']" in line

    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["train", str(tmp_path / "no.h5ad"), "--out", str(tmp_path / "o2"), "--debug"])


def test_library_hints_name_the_flags():
    commands = (
        build_parser()
        .parse_args(["crop", "--tiles", "t", "--cells", "c", "--out", "o", "--channel-names", "a"])
        .commands
    )
    text = "Pass overwrite=True (--overwrite) to start again, or `tile_key=` naming the columns."
    assert cli_wording(text, commands["crop"]) == (
        "Pass --overwrite to start again, or `--tile-key` naming the columns."
    )
    assert cli_wording("pass `overwrite=True` to replace it", commands["simulate"]) == (
        "pass --overwrite to replace it"
    )
    assert cli_wording("pass `tile_key=`", commands["simulate"]) == "pass `tile_key=`"
    text = "skip it with on_error='skip', or pass nonfinite='zero'"
    assert (
        cli_wording(text, commands["crop"])
        == "skip it with --on-error skip, or pass --nonfinite zero"
    )


def test_help_is_light_and_errors_from_the_shell():
    """``--help`` loads no torch, scvi-tools or scanpy; a usage error is one line, status 2."""
    code = (
        "import sys\n"
        "from mcvi_ops.cli import main\n"
        "for command in ([], ['train'], ['embed'], ['evaluate']):\n"
        "    assert main([*command, '--help']) == 0\n"
        "heavy = ('torch', 'lightning', 'scvi', 'scanpy', 'sklearn', 'matplotlib')\n"
        "print('HEAVY', sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in done.stdout
    assert "--perturbation-key" in done.stdout and "--relationships" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "mcvi_ops.cli", "embed", "model"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "mcvi-ops embed: error: the following arguments are required: CELLS, --out "
        "(see 'mcvi-ops embed --help')"
    ]
