"""Saving and loading: no code runs from a model folder, and nothing is written outside it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from scvi.model.base import BaseModelClass

from mcvi_ops import MCVAE, VAE
from mcvi_ops.model import UnsafeModelFileError

from .conftest import FAST_MODULE, FAST_TRAIN


def _model(adata, **kwargs):
    MCVAE.setup_anndata(adata, perturbation_key="gene_symbol")
    return MCVAE(adata, **FAST_MODULE, **kwargs)


class _WritesMarker:
    """Unpickling this runs a shell command (what a crafted model.pt would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_model_file_runs_no_code(screen, tmp_path):
    folder = tmp_path / "model"
    _model(screen).save(folder)
    marker = tmp_path / "code_ran"
    path = folder / "model.pt"
    saved = torch.load(path, weights_only=False)
    saved["attr_dict"]["history_"] = _WritesMarker(marker)
    torch.save(saved, path)
    for load in (
        lambda: MCVAE.load(folder, screen),
        lambda: MCVAE.load_registry(folder),
        lambda: MCVAE.view_setup_args(folder),
    ):
        with pytest.raises(UnsafeModelFileError, match=r"posix\.system.*could run arbitrary code"):
            load()
        assert not marker.exists()
    # the file is really malicious: scvi-tools' way of loading runs the command
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_save_load_round_trip_is_safe_and_identical(screen, tmp_path):
    VAE.setup_anndata(screen, perturbation_key="gene_symbol")
    model = VAE(screen, n_latent=6, **FAST_MODULE)
    model.train(**FAST_TRAIN)
    expected = model.get_latent_representation()
    model.save(tmp_path / "vae", prefix="run1_", save_anndata=True)
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == [
        "run1_adata.h5ad",
        "run1_model.pt",
    ]
    # weights_only=True with the allow-list: history frames and registries load back
    loaded = VAE.load(tmp_path / "vae", prefix="run1_")  # the AnnData saved beside it
    np.testing.assert_array_equal(loaded.get_latent_representation(), expected)
    assert loaded.is_trained
    np.testing.assert_array_equal(loaded.history["train_loss"], model.history["train_loss"])
    registry = VAE.load_registry(tmp_path / "vae", prefix="run1_")
    assert registry["setup_args"]["perturbation_key"] == "gene_symbol"
    with pytest.raises(ValueError, match="holds a VAE model.*mcvi_ops.VAE.load"):
        MCVAE.load(tmp_path / "vae", screen, prefix="run1_")
    with pytest.raises(FileNotFoundError, match=r"run1_model.pt.*prefix="):
        VAE.load(tmp_path / "vae", screen)


@pytest.mark.parametrize("prefix", ["../x_", "sub/x_", "..\\x_", "/tmp/x_", ".."])
def test_prefix_cannot_leave_the_model_folder(screen, tmp_path, prefix):
    model = _model(screen)
    with pytest.raises(ValueError, match="without path separators"):
        model.save(tmp_path / "model", prefix=prefix)
    assert not any(tmp_path.glob("*x_*")) and not (tmp_path / "model").exists()
    with pytest.raises(ValueError, match="without path separators"):
        MCVAE.load(tmp_path / "model", screen, prefix=prefix)


def test_load_without_adata_says_what_to_pass(screen, tmp_path):
    _model(screen).save(tmp_path / "model")
    with pytest.raises(ValueError, match=r"needs the AnnData the model was trained on, linked to"):
        MCVAE.load(tmp_path / "model")
    with pytest.raises(
        ValueError, match=r"needs the AnnData of the cells.*MCVAE.load\(path, adata"
    ):
        MCVAE()


def test_files_saved_by_plain_scvi_tools_load_only_when_trusted(screen, tmp_path):
    """scvi-tools' own save pickles a defaultdict, which weights_only loading cannot rebuild."""
    model = _model(screen)
    BaseModelClass.save(model, str(tmp_path / "model"))
    with pytest.raises(UnsafeModelFileError, match=r"defaultdict.*weights_only=False"):
        MCVAE.load(tmp_path / "model", screen)
    loaded = MCVAE.load(tmp_path / "model", screen, weights_only=False)
    torch.testing.assert_close(loaded.module.transform.high, model.module.transform.high)


# --- reliability v2: atomic saves, folders that cannot be loaded say why ----------------------
def test_a_failed_save_leaves_the_previous_model_loadable(screen, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    model = _model(screen)
    model.save(folder)
    before = (folder / "model.pt").read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=r"No space left.*model saved there before is unchanged"):
        model.save(folder, overwrite=True)
    monkeypatch.undo()
    assert (folder / "model.pt").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["model.pt"]  # no temporary left
    MCVAE.load(folder, screen)
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        model.save(tmp_path / "new")
    assert not (tmp_path / "new").exists()  # a folder created for the failed save is removed


def test_save_replaces_a_symlink_instead_of_writing_through_it(screen, tmp_path):
    folder, outside = tmp_path / "model", tmp_path / "outside.pt"
    outside.write_bytes(b"not yours")
    folder.mkdir()
    (folder / "model.pt").symlink_to(outside)
    _model(screen).save(folder, overwrite=True)
    assert outside.read_bytes() == b"not yours"
    assert not (folder / "model.pt").is_symlink()
    MCVAE.load(folder, screen)


def _edit_saved(folder, edit):
    path = folder / "model.pt"
    saved = torch.load(path, weights_only=False)
    edit(saved)
    torch.save(saved, path)


def test_folders_that_cannot_be_loaded_say_why(screen, tmp_path):
    folder = tmp_path / "model"
    _model(screen).save(folder)
    good = (folder / "model.pt").read_bytes()

    (folder / "model.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is empty \(0 bytes\).*Save the model again"):
        MCVAE.load(folder, screen)
    (folder / "model.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        MCVAE.load(folder, screen)

    def other_shape(saved):
        state = saved["model_state_dict"]
        key = next(k for k in state if k.startswith("decoder") and k.endswith("weight"))
        state[key] = torch.zeros(3, *state[key].shape[1:])

    cases = [
        (other_shape, ValueError, r"weights of other shapes: decoder.*saved \(3,"),
        (
            lambda s: s["attr_dict"]["registry_"].pop("field_registries"),
            ValueError,
            r"another version of mcvi-ops.*lacks \['field_registries'\]",
        ),
        (
            lambda s: s["attr_dict"]["init_params_"]["non_kwargs"].update(n_latent=10),
            TypeError,
            r"parameters \[.*'n_latent'.*\] that this version of mcvi-ops does not take",
        ),
    ]
    for edit, error, match in cases:
        (folder / "model.pt").write_bytes(good)
        _edit_saved(folder, edit)
        with pytest.raises(error, match=match):
            MCVAE.load(folder, screen)


def test_models_saved_without_a_dark_level_load(screen, tmp_path):
    """Version 0.1.0 models had no dark_level buffer (no intensity factors): it defaults to 0."""
    model = _model(screen)
    model.is_trained_ = True
    model.save(tmp_path / "model")
    _edit_saved(tmp_path / "model", lambda s: s["model_state_dict"].pop("dark_level"))
    loaded = MCVAE.load(tmp_path / "model", screen)
    assert float(loaded.module.dark_level.abs().sum()) == 0
    np.testing.assert_allclose(
        loaded.get_latent_representation(), model.get_latent_representation(), atol=1e-5
    )
