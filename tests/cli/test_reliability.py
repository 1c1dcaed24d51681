"""The command line says what happened: exit codes, resuming, one writer, query cells as users have them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import mcvi_ops
from mcvi_ops.cli import main

FAST = ["--max-epochs", "1", "--batch-size", "32", "--accelerator", "cpu", "--quiet"]


def _screen(folder: Path, *, n_genes: int = 4, seed: int = 0) -> Path:
    screen = mcvi_ops.datasets.synthetic_screen(
        n_cells=240,
        n_genes=n_genes,
        n_control_guides=2,
        crop_size=32,
        seed=seed,
        path=folder / "crops.zarr",
    )
    screen.write_h5ad(folder / "screen.h5ad")
    return folder / "screen.h5ad"


@pytest.fixture(scope="module")
def screens(tmp_path_factory) -> dict[str, Path]:
    """Screens A and B (same layout, other cells) and C (one more gene), on disk."""
    root = tmp_path_factory.mktemp("screens")
    return {
        "a": _screen(root / "a"),
        "b": _screen(root / "b", seed=1),
        "c": _screen(root / "c", n_genes=5, seed=2),
    }


@pytest.fixture(scope="module")
def trained(screens, tmp_path_factory) -> Path:
    """A finished run on screen A with a batch key."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", str(screens["a"]), "--out", str(out), *FAST, "--batch-key", "well"]) == 0
    return out


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def _copy_run(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def test_resume_continues_only_the_run_of_these_cells(screens, trained, tmp_path, capsys):
    out = _copy_run(trained, tmp_path)
    model_file = out / "model" / "model.pt"
    before = model_file.stat().st_mtime_ns
    train = ["train", "--out", out, *FAST, "--batch-key", "well"]

    # a finished run gives its model, and says how to train longer
    status, text, _ = _run([*train[:1], screens["a"], *train[1:], "--resume"], capsys)
    assert status == 0 and "finished (1 epochs)" in text and "--max-epochs above 1" in text
    assert model_file.stat().st_mtime_ns == before

    # other cells of the same layout: refused, the checkpoints untouched
    status, _, err = _run([*train[:1], screens["b"], *train[1:], "--resume"], capsys)
    assert status == 2
    assert "belong to a run on other cells" in err and "--overwrite" in err
    # other set-up options
    status, _, err = _run(
        ["train", screens["a"], "--out", out, *FAST, "--batch-key", "plate", "--resume"], capsys
    )
    assert status == 2 and "--batch-key 'plate' (run: 'well')" in err

    # a run folder without its record (an older version): the shapes still say it
    (out / "run.json").unlink()
    status, _, err = _run([*train[:1], screens["c"], *train[1:], "--resume"], capsys)
    assert status == 2 and "belongs to a run on another screen" in err and "--overwrite" in err

    # checkpoints of an unfinished run are never silently overwritten
    shutil.rmtree(out / "model")
    (out / "screen.h5ad").unlink()
    status, _, err = _run([*train[:1], screens["b"], *train[1:]], capsys)
    assert status == 2 and "unfinished run" in err and "--resume" in err and "--overwrite" in err

    # --overwrite clears the old run's checkpoints before training: the new run is resumable
    status, _, _ = _run([*train[:1], screens["b"], *train[1:], "--overwrite"], capsys)
    assert status == 0
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    status, text, _ = _run([*train[:1], screens["b"], *train[1:], "--resume"], capsys)
    assert status == 0 and "finished" in text

    status, _, err = _run([*train[:1], screens["a"], *train[1:], "--resume", "--overwrite"], capsys)
    assert status == 2 and "either --resume" in err


def test_bad_outputs_are_found_before_any_work(screens, tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    status, _, err = _run(["train", screens["a"], "--out", afile, *FAST], capsys)
    assert status == 2 and "afile' is a file" in err and afile.read_text() == "mine"
    status, _, err = _run(
        ["train", screens["a"], "--out", tmp_path / "o", "--devices", "abc"], capsys
    )
    assert status == 2 and "argument --devices" in err and "'abc'" in err

    cells = ad.read_h5ad(screens["a"])
    wells = cells.obs["well"].astype(object)
    wells.iloc[:3] = np.nan
    cells.obs["well"] = wells
    cells.write_h5ad(tmp_path / "nan_well.h5ad")
    status, _, err = _run(
        ["train", tmp_path / "nan_well.h5ad", "--out", tmp_path / "o", "--batch-key", "well"],
        capsys,
    )
    assert status == 2 and "3 cells" in err and "--batch-key" in err

    real_write = Path.write_bytes

    def read_only(self, data):
        if ".write-test" in self.name:
            raise PermissionError(13, "Permission denied")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    status, _, err = _run(["train", screens["a"], "--out", tmp_path / "ro", *FAST], capsys)
    assert status == 2 and "cannot be written (Permission denied)" in err
    monkeypatch.undo()
    status, _, err = _run(
        ["embed", tmp_path, screens["a"], "--out", tmp_path / "folder.h5ad"], capsys
    )
    assert status == 2 and "not a saved model folder" in err


def _hold(lock_file: Path) -> None:
    """Write the lock file of another running process (pid 1 is always alive)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock_file.write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "time": 0}))


def test_one_writer_per_output(screens, trained, tmp_path, capsys):
    out = tmp_path / "busy"
    _hold(out / ".mcvi-ops.lock")
    status, _, err = _run(["train", screens["a"], "--out", out, *FAST], capsys)
    assert status == 2 and "output folder" in err and "being written by process 1" in err
    assert sorted(p.name for p in out.iterdir()) == [".mcvi-ops.lock"]
    embedded = tmp_path / "embedded.h5ad"
    _hold(Path(f"{embedded}.lock"))
    status, _, err = _run(["embed", trained / "model", screens["a"], "--out", embedded], capsys)
    assert status == 2 and "being written by process 1" in err and not embedded.exists()


def test_ctrl_c_never_exits_0_and_resume_finishes_the_run(screens, tmp_path, capsys, monkeypatch):
    """Ctrl-C during training (the first stops after the step): status 130, nothing written as
    if finished; --resume continues. The cells carry integer perturbation codes."""
    cells = ad.read_h5ad(screens["a"])
    categories = cells.obs["gene_symbol"].astype("category")
    control = list(categories.cat.categories).index("nontargeting")
    cells.obs["gene_symbol"] = categories.cat.codes.astype(int).to_numpy()
    cells.write_h5ad(tmp_path / "coded.h5ad")
    from mcvi_ops.train import EpochSeed

    original = EpochSeed.on_train_batch_start

    def interrupt_at_step_2(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, trainer, pl_module, batch, batch_idx)

    out = tmp_path / "run"
    train = ["train", tmp_path / "coded.h5ad", "--out", out, *FAST]
    train += ["--control-category", str(control)]
    monkeypatch.setattr(EpochSeed, "on_train_batch_start", interrupt_at_step_2)
    status, _, err = _run(train, capsys)
    assert status == 130 and "stopped by Ctrl-C" in err and "--resume" in err
    assert not (out / "model").exists() and not (out / "screen.h5ad").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert (out / "checkpoints" / "interrupted.ckpt").is_file()
    monkeypatch.undo()
    status, _, err = _run([*train, "--resume"], capsys)
    assert status == 0, err
    assert (out / "model" / "model.pt").is_file()


def test_a_failed_checkpoint_names_the_file_and_the_fix(screens, tmp_path, capsys, monkeypatch):
    import lightning.pytorch as pl

    def too_large(self, filepath, *args, **kwargs):
        raise OSError(27, "File too large")

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", too_large)
    out = tmp_path / "run"
    status, _, err = _run(["train", screens["a"], "--out", out, *FAST], capsys)
    assert status == 2
    assert "last.ckpt" in err and "File too large" in err and "rerun with --resume" in err
    assert not (out / "model").exists()


def test_embed_takes_query_cells_as_users_have_them(screens, trained, tmp_path, capsys):
    expected = ad.read_h5ad(trained / "screen.h5ad").obsm["X_mcvae"]
    cells = ad.read_h5ad(screens["a"])
    genes = cells.obs["gene_symbol"].astype(object)
    genes.iloc[:10] = np.nan  # e.g. brieflow cells without a barcode
    cells.obs["gene_symbol"] = genes
    del cells.obs["well"]  # the model was trained with --batch-key well
    cells.write_h5ad(tmp_path / "query.h5ad")
    cells[:0].copy().write_h5ad(tmp_path / "zero.h5ad")
    for name, n in (("query", cells.n_obs), ("zero", 0)):
        out = tmp_path / f"{name}_embedded.h5ad"
        status, _, err = _run(
            ["embed", trained / "model", tmp_path / f"{name}.h5ad", "--out", out], capsys
        )
        assert status == 0, err
        embedded = ad.read_h5ad(out)
        assert embedded.obsm["X_mcvae"].shape == (n, 64)
        assert not any(c.startswith("_scvi") for c in embedded.obs)
    np.testing.assert_allclose(
        ad.read_h5ad(tmp_path / "query_embedded.h5ad").obsm["X_mcvae"], expected, atol=1e-5
    )
    status, help_text, _ = _run(["embed", "--help"], capsys)
    assert "never saw" in help_text and "zero cells" in help_text and "Refused" in help_text


def test_evaluate_relationship_files_of_the_same_name(screens, trained, tmp_path, capsys):
    gmt = screens["a"].parent / "crops_complexes.gmt"
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        shutil.copy(gmt, tmp_path / folder / "CORUM.gmt")
    out = tmp_path / "report"
    args = ["evaluate", trained / "screen.h5ad", "--out", out, "--umap-cells", "0"]
    args += ["--min-pairs", "1", "--relationships", tmp_path / "x" / "CORUM.gmt"]
    args += [tmp_path / "y" / "CORUM.gmt", tmp_path / "x" / "CORUM.gmt"]
    status, _, err = _run(args, capsys)
    assert status == 0, err
    scores = pd.read_csv(out / "known_relationships.csv")
    assert set(scores["source"]) == {"x_CORUM", "y_CORUM"}
    text = (out / "report.md").read_text()
    assert "| x_CORUM |" in text and "| y_CORUM |" in text
    assert not [p for p in out.iterdir() if ".partial-" in p.name]
