"""What a notebook user sees: set-up summaries, log messages and progress bars."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest
import rich

from mcvi_ops import MCVAE

from .conftest import FAST_MODULE


def _model(adata):
    MCVAE.setup_anndata(adata, perturbation_key="gene_symbol")
    return MCVAE(adata, **FAST_MODULE)


def test_view_anndata_setup_without_rich_pretty_imported(screen, tmp_path, monkeypatch, capsys):
    model = _model(screen)
    model.save(tmp_path / "model")
    # a fresh session: rich 15 does not import rich.pretty, which scvi-tools 1.4.2 uses
    monkeypatch.delitem(sys.modules, "rich.pretty", raising=False)
    monkeypatch.delattr(rich, "pretty", raising=False)
    model.view_anndata_setup()
    out = capsys.readouterr().out
    assert "setup_anndata" in out and "gene_symbol" in out and "Image crops" in out
    monkeypatch.delitem(sys.modules, "rich.pretty", raising=False)
    monkeypatch.delattr(rich, "pretty", raising=False)
    MCVAE.view_setup_args(tmp_path / "model")
    assert "perturbation_key" in capsys.readouterr().out


_LOG_SCRIPT = """
import logging
import mcvi_ops.model
import mcvi_ops.model._base  # importing again adds no second handler
from mcvi_ops._logging import settings
log = logging.getLogger("mcvi_ops.anything")
log.info("info shown")
settings.verbosity = "WARNING"
log.info("info hidden")
log.warning("warning shown")
print(len(logging.getLogger("mcvi_ops").handlers), logging.getLogger().handlers)
"""


def test_package_logs_show_like_scvi_tools():
    result = subprocess.run(
        [sys.executable, "-c", _LOG_SCRIPT], capture_output=True, text=True, check=True
    )
    assert "info shown" in result.stderr and "warning shown" in result.stderr
    assert "info hidden" not in result.stderr
    assert result.stdout.split() == ["1", "[]"]  # one handler of our own; root untouched


def test_verbosity_setting():
    from mcvi_ops._logging import settings

    old = logging.getLogger("mcvi_ops").level
    try:
        settings.verbosity = "debug"
        assert settings.verbosity == logging.DEBUG
        with pytest.raises(ValueError, match="Unknown verbosity 'LOUD'"):
            settings.verbosity = "loud"
    finally:
        logging.getLogger("mcvi_ops").setLevel(old)


def test_training_progress_bar_moves_per_step_with_cells_per_second(screen, capsys, monkeypatch):
    monkeypatch.setattr("mcvi_ops.model._train.interactive_output", lambda: True)  # a terminal
    model = _model(screen)
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=True, train_size=1.0)
    err = capsys.readouterr().out  # Lightning's bars write to stdout
    steps = model._steps_per_epoch(64, 1.0)
    # one refresh per step, each with the cells trained per second
    seen = {int(m) for m in re.findall(rf"\b(\d+)/{steps}\b", err)}
    assert set(range(1, steps + 1)) <= seen
    assert re.search(r"cells/s=[\d,]+", err)
    assert model.trainer.progress_bar_callback.cells_per_second > 0


def test_progress_in_a_log_file_is_one_line_per_epoch(screen, capsys, caplog):
    model = _model(screen)
    with caplog.at_level(logging.INFO, logger="mcvi_ops"):
        model.train(max_epochs=2, batch_size=64, enable_progress_bar=True)
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err  # no bar redrawn line after line
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Epoch ")]
    assert len(lines) == 2
    pattern = r"Epoch 1/2: train_loss [\d.e+-]+, validation_loss [\d.e+-]+, [\d,]+ cells/s, \d+ s"
    assert re.fullmatch(pattern, lines[0]), lines[0]
    assert lines[1].startswith("Epoch 2/2: ")


def test_no_lightning_advertisement_in_the_output(screen, capsys, caplog):
    model = _model(screen)
    with caplog.at_level(logging.INFO):
        model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    captured = capsys.readouterr()
    shown = captured.out + captured.err + caplog.text
    assert "GPU available" in shown  # Lightning's other messages are still there
    assert not re.search("litlogger|litmodels|Tip:", shown)
    assert not logging.getLogger("lightning.pytorch.utilities.rank_zero").filters  # scoped


def test_embedding_progress_bar(screen, capsys, monkeypatch):
    model = _model(screen)
    model.is_trained_ = True
    model.get_latent_representation(batch_size=32, progress_bar=True)
    assert f"{screen.n_obs}/{screen.n_obs}" in capsys.readouterr().err
    model.get_reconstruction(indices=range(100), batch_size=8, progress_bar=None)  # 13 batches
    assert "100/100" not in capsys.readouterr().err  # a log file: no bar by default
    monkeypatch.setattr("mcvi_ops.dataloaders._inference.interactive_output", lambda: True)
    model.get_reconstruction(indices=range(100), batch_size=8, progress_bar=None)
    assert "100/100" in capsys.readouterr().err  # a terminal: a bar for long runs
    model.get_latent_representation(batch_size=32, progress_bar=False)
    model.get_latent_representation(batch_size=128)  # 3 batches: quiet by default
    assert f"/{screen.n_obs}" not in capsys.readouterr().err
