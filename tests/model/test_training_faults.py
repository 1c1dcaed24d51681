"""Training ends cleanly: divergence, bad inputs, Ctrl-C, checkpoints and resuming."""

from __future__ import annotations

import re
import signal

import lightning.pytorch as pl
import numpy as np
import pytest
import scvi
import torch
import zarr

from mcvi_ops import MCVAE
from mcvi_ops.data import link_crops, linked_store, write_crops
from mcvi_ops.train import NonFiniteCropsError, TrainingDivergedError

from .conftest import FAST_MODULE, FAST_TRAIN


def _model(adata, **kwargs):
    MCVAE.setup_anndata(adata, perturbation_key="gene_symbol")
    return MCVAE(adata, **FAST_MODULE, **kwargs)


def _weights(model):
    return torch.cat([p.detach().flatten().cpu() for p in model.module.parameters()])


def test_divergence_stops_keeps_good_weights_and_is_not_trained(screen):
    model = _model(screen)
    before = _weights(model)
    with pytest.raises(TrainingDivergedError, match=r"loss exploded.*not marked as trained.*`lr`"):
        model.train(**{**FAST_TRAIN, "max_epochs": 3}, lr=10.0)
    assert not model.is_trained
    # with lr=10 the second step explodes: the first step's starting weights are put back
    torch.testing.assert_close(_weights(model), before)
    assert np.isfinite(model.get_latent_representation()).all()
    assert "train_loss" in model.history


class _PoisonWeights(pl.Callback):
    """Make the weights NaN after a few steps, as an overflow would."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            with torch.no_grad():
                next(pl_module.module.parameters()).fill_(float("nan"))


def test_nonfinite_weights_stop_training_with_a_clear_error(screen, capsys):
    model = _model(screen)
    with pytest.raises(TrainingDivergedError, match="weights became NaN"):
        model.train(**FAST_TRAIN, callbacks=[_PoisonWeights()])
    assert torch.isfinite(_weights(model)).all() and not model.is_trained
    out = capsys.readouterr()
    assert "Exception raised during training" not in out.out + out.err
    assert "NameError" not in out.out + out.err


@pytest.mark.parametrize("max_epochs", [0, -1, 1.5, True])
def test_max_epochs_must_be_positive(screen, max_epochs):
    model = _model(screen)
    with pytest.raises(ValueError, match="`max_epochs` must be a positive integer"):
        model.train(max_epochs=max_epochs, batch_size=64)
    with pytest.raises(FileNotFoundError, match="No checkpoint at"):
        model.train(max_epochs=1, batch_size=64, ckpt_path="missing.ckpt")


def test_train_size_one_trains_without_validation(screen):
    model = _model(screen)
    model.train(**FAST_TRAIN, train_size=1.0)  # early stopping is on by default
    assert model.is_trained
    assert "train_loss" in model.history and "validation_loss" not in model.history
    assert len(model.validation_indices) == 0
    assert len(model.train_indices) == screen.n_obs
    # checkpoints go to a run folder under scvi's logging folder by default
    assert len(list(scvi.settings.logging_dir.glob("MCVAE_run_*/checkpoints/last.ckpt"))) == 1


def test_max_steps_within_the_first_epoch_trains_without_early_stopping(screen, caplog):
    model = _model(screen)
    with caplog.at_level("INFO", logger="mcvi_ops.model._train"):
        # early stopping is on by default; no validation runs before step 2 ends the run
        model.train(**FAST_TRAIN, max_steps=2)
    assert model.is_trained and model.trainer.global_step == 2
    assert "before any validation: training without early stopping" in caplog.text


def _is_channels_last(model) -> bool:
    conv = next(m for m in model.module.modules() if isinstance(m, torch.nn.Conv2d))
    return conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    ("bf16", "expected_precision", "expected_channels_last"),
    [(True, "bf16-mixed", False), (False, "32-true", True)],
)
def test_cpu_defaults_pick_precision_and_memory_format(
    screen, monkeypatch, bf16, expected_precision, expected_channels_last
):
    import mcvi_ops.model._train as train_module

    monkeypatch.setattr(train_module, "cpu_has_bf16", lambda: bf16)
    model = _model(screen)
    model.train(**FAST_TRAIN, accelerator="cpu", max_steps=1)
    assert model.trainer.precision == expected_precision
    assert _is_channels_last(model) is expected_channels_last
    # an explicit choice wins over the defaults
    model = _model(screen)
    model.train(**FAST_TRAIN, accelerator="cpu", max_steps=1, precision="32", channels_last=False)
    assert model.trainer.precision == "32-true"
    assert not _is_channels_last(model)


class _CtrlC(pl.Callback):
    """Press Ctrl-C at the first step of the second epoch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 0:
            signal.raise_signal(signal.SIGINT)


def test_ctrl_c_keeps_the_model_and_resuming_matches_an_uninterrupted_run(screen, tmp_path):
    train = {**FAST_TRAIN, "max_epochs": 2}
    scvi.settings.seed = 0
    uninterrupted = _model(screen)
    uninterrupted.train(**train, checkpoint_dir=tmp_path / "a")

    scvi.settings.seed = 0
    interrupted = _model(screen)
    handler = signal.getsignal(signal.SIGINT)
    interrupted.train(**train, checkpoint_dir=tmp_path / "b", callbacks=[_CtrlC()])
    assert signal.getsignal(signal.SIGINT) is handler
    assert interrupted.is_trained  # usable: weights and history so far
    assert len(interrupted.history["train_loss"]) == 2  # one epoch and one step
    assert interrupted.get_latent_representation().shape == (screen.n_obs, 64)
    interrupted.save(tmp_path / "saved")
    assert (tmp_path / "b" / "last.ckpt").is_file() and (
        tmp_path / "b" / "interrupted.ckpt"
    ).is_file()
    assert not torch.equal(_weights(interrupted), _weights(uninterrupted))

    # a new session: a new model on the same data continues from the last complete epoch
    scvi.settings.seed = 0
    resumed = _model(screen)
    resumed.train(**train, checkpoint_dir=tmp_path / "c", ckpt_path=tmp_path / "b" / "last.ckpt")
    torch.testing.assert_close(_weights(resumed), _weights(uninterrupted), rtol=1e-5, atol=1e-6)
    assert resumed.is_trained


@pytest.fixture
def nan_screen(screen, tmp_path):
    """The screen relinked to a float32 copy of its crops with NaN in two cells."""
    crops = linked_store(screen).to_numpy().astype(np.float32)
    path = tmp_path / "nan.zarr"
    write_crops(path, crops, channel_names=linked_store(screen).channel_names, chunk_cells=64)
    control = int(np.flatnonzero(screen.obs["gene_symbol"] == "nontargeting")[0])
    perturbed = int(np.flatnonzero(screen.obs["gene_symbol"] != "nontargeting")[5])
    adata = screen.copy()
    link_crops(adata, path)
    return adata, path, control, perturbed


def _poison(path, row):
    # stores written by mcvi-ops refuse NaN; older or foreign ones may hold it
    zarr.open_group(str(path), mode="r+")["crops"][row, 1, 3, 3] = np.nan


def test_nonfinite_crops_are_named_when_scaling_the_inputs(nan_screen):
    adata, path, control, _ = nan_screen
    _poison(path, control)
    name = re.escape(f"'{adata.obs_names[control]}' (crop {control})")
    with pytest.raises(NonFiniteCropsError, match=f"NaN or infinite pixel values: {name}"):
        _model(adata)


def test_nonfinite_crops_are_named_in_training_and_embedding(nan_screen, capsys):
    adata, path, _, perturbed = nan_screen
    _poison(path, perturbed)
    model = _model(adata)  # the sampled controls are clean
    name = re.escape(f"'{adata.obs_names[perturbed]}' (crop {perturbed})")
    with pytest.raises(NonFiniteCropsError, match=f"minibatch hold NaN.*{name}.*nonfinite='zero'"):
        model.train(**FAST_TRAIN, train_size=1.0)
    assert not model.is_trained
    out = capsys.readouterr()
    assert "NameError" not in out.out + out.err
    with pytest.raises(NonFiniteCropsError, match=f"to embed hold NaN.*{name}"):
        model.get_latent_representation()


def test_extreme_pixels_in_controls_do_not_collapse_the_embedding(screen, tmp_path):
    """1e30 in 5% of the control crops: the input scaling ignores them, cells stay apart."""
    crops = linked_store(screen).to_numpy().astype(np.float32)
    controls = np.flatnonzero(screen.obs["gene_symbol"] == "nontargeting")
    corrupt = crops.copy()
    corrupt[controls[: len(controls) // 20]] = 1e30  # whole crops of 5% of the controls
    spreads = []
    for name, values in (("clean.zarr", crops), ("extreme.zarr", corrupt)):
        adata = screen.copy()
        write_crops(tmp_path / name, values, channel_names=linked_store(screen).channel_names)
        link_crops(adata, tmp_path / name)
        scvi.settings.seed = 0
        model = _model(adata)
        model.train(**FAST_TRAIN)
        clean_cells = np.flatnonzero((corrupt != 1e30).all(axis=(1, 2, 3)))
        latent = model.get_latent_representation(indices=clean_cells, kind="background")
        spreads.append(latent.std(axis=0).mean())
    assert spreads[1] > 0.5 * spreads[0]


# --- reliability v2 --------------------------------------------------------------------------
def test_ckpt_path_of_a_saved_model_says_what_to_do(screen, tmp_path):
    model = _model(screen)
    model.train(**FAST_TRAIN)
    model.save(tmp_path / "model")
    for path in (tmp_path / "model" / "model.pt", tmp_path / "renamed.ckpt"):
        if not path.exists():
            path.write_bytes((tmp_path / "model" / "model.pt").read_bytes())
        with pytest.raises(ValueError, match=r"is not a training checkpoint.*MCVAE.load\(folder"):
            _model(screen).train(**FAST_TRAIN, ckpt_path=path)


def test_a_checkpoint_that_cannot_be_written_is_named_and_the_last_one_kept(
    screen, tmp_path, monkeypatch
):
    folder = tmp_path / "run"
    model = _model(screen)
    model.train(**FAST_TRAIN, checkpoint_dir=folder)
    before = (folder / "last.ckpt").read_bytes()

    def too_large(self, filepath, *args, **kwargs):
        with open(filepath, "wb") as handle:
            handle.write(b"partial")
        raise OSError(27, "File too large")

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", too_large)
    model = _model(screen)
    with pytest.raises(
        OSError, match=r"last.ckpt'.*File too large.*previous checkpoint.*unchanged"
    ):
        model.train(**FAST_TRAIN, checkpoint_dir=folder)
    assert (folder / "last.ckpt").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert "validation_loss" in model.history  # the history so far is kept


def test_default_checkpoints_are_named_and_removed_by_save(screen, tmp_path, caplog):
    model = _model(screen)
    with caplog.at_level("INFO", logger="mcvi_ops"):
        model.train(**FAST_TRAIN)
    folder = model._temporary_checkpoints
    assert folder.parent.parent == scvi.settings.logging_dir  # scvi_log/<run>/checkpoints
    assert (folder / "last.ckpt").is_file()
    assert f"Checkpoints of this run: {folder}" in caplog.text
    model.save(tmp_path / "model")
    assert not folder.exists() and not folder.parent.exists()
    assert "Removed the checkpoints of training" in caplog.text

    chosen = tmp_path / "mine"
    model.train(**FAST_TRAIN, checkpoint_dir=chosen)
    model.save(tmp_path / "model", overwrite=True)
    assert (chosen / "last.ckpt").is_file()  # a folder the user chose is kept


def test_arguments_moved_into_groups_still_work_with_a_warning(screen, monkeypatch):
    seen = {}
    model = _model(screen)
    original = type(model)._data_splitter_cls

    def splitter(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "_data_splitter_cls", splitter)
    with pytest.warns(FutureWarning, match=r"plan_kwargs=\{'weight_decay': 1e-06\}"):
        with pytest.warns(FutureWarning, match=r"datasplitter_kwargs=\{'window_chunks': 2\}"):
            model.train(**FAST_TRAIN, weight_decay=1e-6, window_chunks=2)
    assert seen["window_chunks"] == 2
    plan = model.trainer.lightning_module
    assert plan.weight_decay == 1e-6
    assert plan.eps == 1e-8  # the image models' Adam epsilon stays
