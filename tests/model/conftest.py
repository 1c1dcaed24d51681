from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mcvi_ops


@pytest.fixture(autouse=True)
def _run_folder(tmp_path, monkeypatch):
    """Training writes its default checkpoints under scvi's logging folder: keep it temporary."""
    import scvi

    monkeypatch.setattr(scvi.settings, "logging_dir", tmp_path / "scvi_log")


@pytest.fixture(scope="module")
def screen_path(tmp_path_factory):
    return tmp_path_factory.mktemp("screen") / "crops.zarr"


@pytest.fixture
def screen(screen_path):
    """A tiny screen on disk: 360 cells, 6 genes, 32 px crops."""
    return mcvi_ops.datasets.synthetic_screen(
        n_cells=360,
        n_genes=6,
        n_control_guides=4,
        crop_size=32,
        seed=0,
        path=screen_path,
        overwrite=True,
    )


FAST_MODULE = {"encoder_filters": (8, 8, 16, 16, 16), "decoder_filters": (16, 16, 16, 8, 8)}
FAST_TRAIN = {"max_epochs": 1, "batch_size": 64, "enable_progress_bar": False}


def tiny_screen_on_disk(folder: Path, **kwargs):
    """The tiny screen (360 cells, 32 px) written as a crop store and an h5ad in ``folder``."""
    screen = mcvi_ops.datasets.synthetic_screen(
        n_cells=360,
        n_genes=6,
        n_control_guides=4,
        crop_size=32,
        seed=0,
        path=folder / "crops.zarr",
        **kwargs,
    )
    screen.write_h5ad(folder / "screen.h5ad")
    return screen


def run_script(script: Path, *args, cwd: Path, timeout: int) -> None:
    """Run a multi-process test script with one thread per process; fail with its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
