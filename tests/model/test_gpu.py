"""GPU checks (run with `pytest -m gpu` on a machine with CUDA; CI has none)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mcvi_ops import MCVAE

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("precision", [None, "bf16-mixed"])
def test_trains_on_gpu(screen, precision):
    MCVAE.setup_anndata(screen, perturbation_key="gene_symbol")
    model = MCVAE(screen)
    model.train(max_epochs=2, batch_size=64, accelerator="gpu", devices=1, precision=precision)
    assert model.module.device.type == "cuda"
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
    cpu_copy = model.get_latent_representation()
    assert cpu_copy.shape == (screen.n_obs, 64)
