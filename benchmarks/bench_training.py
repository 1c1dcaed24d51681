"""Training, loading and embedding throughput of MCVAE on this machine.

Side by side in one run, at 64 px and batch 256:

1. ``model.train()`` (scvi-tools TrainingPlan + Lightning + the chunk-aware zarr loader), cells/s
   over the training batches of the last epochs;
2. a plain PyTorch loop over the same module reading batches from an in-memory tensor (the floor
   for framework overhead);
3. the training loader alone, reading balanced batches from the zarr store (must be >= 3x (1));
4. ``get_latent_representation`` (embedding), cells/s.

    python benchmarks/bench_training.py [--n-cells 6000] [--epochs 2] [--precision bf16-mixed]

Writes benchmarks/results/training.md (or training_<tag>.md).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import scvi
import torch
from _report import machine_line, markdown_table

import mcvi_ops
from mcvi_ops import MCVAE

RESULTS = Path(__file__).parent / "results"


class BatchTimer(pl.Callback):
    """Wall time and cells of every training batch (data loading included)."""

    def __init__(self) -> None:
        self.records: list[tuple[int, float, int]] = []
        self._last = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.records.append((trainer.current_epoch, now - self._last, len(batch["X"])))
        self._last = now


def train_throughput(model, epochs, batch_size, precision, accelerator):
    timer = BatchTimer()
    model.train(
        max_epochs=epochs,
        batch_size=batch_size,
        early_stopping=False,
        enable_progress_bar=False,
        callbacks=[timer],
        accelerator=accelerator,
        precision=precision,
        check_val_every_n_epoch=10_000,
    )
    records = pd.DataFrame(timer.records, columns=["epoch", "seconds", "cells"]).iloc[2:]
    return records["cells"].sum() / records["seconds"].sum()


def plain_loop_throughput(module, crops, codes, batch_size, n_batches, device, precision):
    module = module.to(device).train()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    x = torch.as_tensor(crops, dtype=torch.float32)
    p = torch.as_tensor(codes).unsqueeze(-1)
    rng = np.random.default_rng(0)
    times = []
    autocast = precision == "bf16-mixed"
    for step in range(n_batches + 2):
        rows = torch.as_tensor(rng.choice(len(x), batch_size, replace=False))
        start = time.perf_counter()
        batch = {"X": x[rows].to(device), "perturbation": p[rows].to(device)}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            _, _, loss = module(batch, loss_kwargs={"kl_weight": 1.0})
        optimizer.zero_grad()
        loss.loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 10.0)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return batch_size * len(times) / sum(times)


def loader_throughput(model, batch_size):
    splitter = model._data_splitter_cls(model.adata_manager, batch_size=batch_size)
    splitter.setup()
    loader = splitter.train_dataloader()
    start = time.perf_counter()
    n = sum(len(batch["X"]) for batch in loader)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=6_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--crop-size", type=int, default=64)
    parser.add_argument("--precision", default=None)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(
        "cuda" if torch.cuda.is_available() and args.accelerator != "cpu" else "cpu"
    )
    with tempfile.TemporaryDirectory() as tmp:
        adata = mcvi_ops.datasets.synthetic_screen(
            n_cells=args.n_cells, crop_size=args.crop_size, seed=0, path=Path(tmp) / "s.zarr"
        )
        scvi.settings.seed = 0
        MCVAE.setup_anndata(adata, perturbation_key="gene_symbol")
        model = MCVAE(adata)
        loader = loader_throughput(model, args.batch_size)
        train = train_throughput(
            model, args.epochs, args.batch_size, args.precision, args.accelerator
        )
        start = time.perf_counter()
        model.get_latent_representation(kind="both", batch_size=1024)
        embed = adata.n_obs / (time.perf_counter() - start)
        crops = mcvi_ops.data.get_crops(adata)
        codes = model.adata_manager.get_from_registry("perturbation").reshape(-1)
        scvi.settings.seed = 0
        plain = plain_loop_throughput(
            MCVAE(adata).module, crops, codes, args.batch_size, 20, device, args.precision
        )
    table = pd.DataFrame(
        [
            ("model.train() (Lightning + zarr loader)", round(train)),
            ("plain PyTorch loop, in-memory tensor", round(plain)),
            ("training loader alone (zarr, balanced)", round(loader)),
            ("get_latent_representation (embedding)", round(embed)),
        ],
        columns=["what", "cells/s"],
    )
    print(table.to_string(index=False))
    print(f"overhead vs plain loop: {plain / train:.2f}x; loader / training: {loader / train:.1f}x")
    suffix = f"_{args.tag}" if args.tag else ""
    (RESULTS / f"training{suffix}.md").write_text(
        f"# Training throughput{f' ({args.tag})' if args.tag else ''}\n\n"
        f"Recorded {machine_line()}.\n\n"
        f"`python benchmarks/bench_training.py --n-cells {args.n_cells} --epochs {args.epochs} "
        f"--batch-size {args.batch_size} --crop-size {args.crop_size}"
        f"{' --precision ' + args.precision if args.precision else ''}` (device: {device})\n\n"
        + markdown_table(table, index=False)
        + f"\n\nFramework overhead (plain loop / model.train): {plain / train:.2f}x. "
        f"Loader / training: {loader / train:.1f}x.\n"
    )


if __name__ == "__main__":
    main()
