"""Train MCVAE with Lightning DDP on 2 CPU processes (gloo); run by tests/model/test_ddp.py.

    python tests/model/ddp_train.py SCREEN_DIR OUT_DIR

Lightning re-runs this script for rank 1. Each rank writes the crop indices and perturbation codes
it trained on per epoch, and a checksum of its final weights, to OUT_DIR/rank<k>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import scvi
import torch

import mcvi_ops


class RecordBatches(pl.Callback):
    def __init__(self) -> None:
        self.seen: dict[int, list[list[int]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rows = torch.cat([batch["crop_index"], batch["perturbation"]], dim=1).tolist()
        self.seen.setdefault(trainer.current_epoch, []).extend(rows)


def main(screen_dir: Path, out_dir: Path) -> None:
    scvi.settings.seed = 0
    adata = ad.read_h5ad(screen_dir / "screen.h5ad")  # written by the test before launching
    mcvi_ops.MCVAE.setup_anndata(adata, perturbation_key="gene_symbol")
    model = mcvi_ops.MCVAE(
        adata, encoder_filters=(8, 8, 16, 16, 16), decoder_filters=(16, 16, 16, 8, 8)
    )
    recorder = RecordBatches()
    model.train(
        max_epochs=2,
        batch_size=32,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        enable_progress_bar=False,
        callbacks=[recorder],
    )
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    crop_index = adata.obs["crop_index"].to_numpy()
    codes = model.adata_manager.get_from_registry("perturbation").reshape(-1)
    train = np.asarray(model.train_indices)
    weights = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])
    record = {
        "rank": rank,
        "world_size": torch.distributed.get_world_size()
        if torch.distributed.is_initialized()
        else 1,
        "epochs": {str(k): v for k, v in recorder.seen.items()},
        "weights_sum": float(weights.double().sum()),
        "weights_abs_sum": float(weights.double().abs().sum()),
        "train_perturbed": sorted(int(i) for i in crop_index[train][codes[train] != 0]),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
