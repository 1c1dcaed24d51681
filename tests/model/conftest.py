from __future__ import annotations

import os
import shutil
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


@pytest.fixture(scope="session")
def _rendered_screen(tmp_path_factory):
    """The tiny screen, simulated and rendered once per session (read-only: tests get copies)."""
    path = tmp_path_factory.mktemp("rendered") / "crops.zarr"
    adata = mcvi_ops.datasets.synthetic_screen(
        n_cells=360, n_genes=6, n_control_guides=4, crop_size=32, seed=0, path=path
    )
    return adata, path


@pytest.fixture
def screen_path(_rendered_screen, tmp_path):
    """This test's own copy of the rendered crop store (a test may rewrite or shrink it)."""
    _, rendered = _rendered_screen
    path = tmp_path / "screen" / "crops.zarr"
    shutil.copytree(rendered, path)
    return path


@pytest.fixture
def screen(_rendered_screen, screen_path):
    """A tiny screen on disk: 360 cells, 6 genes, 32 px crops (a fresh AnnData per test)."""
    adata = _rendered_screen[0].copy()
    mcvi_ops.data.link_crops(adata, screen_path, index_key="crop_index")
    return adata


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
