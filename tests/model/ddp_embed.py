"""Embed cells with Lightning DDP on 2 CPU processes (gloo); run by tests/model/test_embed_ddp.py.

    python tests/model/ddp_embed.py WORK_DIR

Loads WORK_DIR/screen.h5ad and the model in WORK_DIR/model, embeds every cell (``kind="both"``)
and a permuted subset of rows (``kind="salient"``) with ``devices=2, strategy="ddp"``, and writes
each rank's results to WORK_DIR/rank<k>_{all,subset}.npy. Lightning re-runs this script for rank 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anndata as ad
import numpy as np
import torch

import mcvi_ops


def main(work: Path) -> None:
    adata = ad.read_h5ad(work / "screen.h5ad")
    model = mcvi_ops.MCVAE.load(work / "model", adata)
    options = {"devices": 2, "accelerator": "cpu", "strategy": "ddp", "batch_size": 50}
    every = model.get_latent_representation(kind="both", **options)
    subset = np.load(work / "subset.npy")
    salient = model.get_latent_representation(indices=subset, kind="salient", **options)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    np.save(work / f"rank{rank}_all.npy", every)
    np.save(work / f"rank{rank}_subset.npy", salient)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
