"""Training speed of MCVAE on this machine: precisions and memory formats side by side.

    python benchmarks/bench_training.py [--n-cells 3000] [--batch-size 128] [--repeats 2]
        [--quality] [--out benchmarks/results/training_run.md]

All in one run, at 64 px, batch 128 and the default architecture:

1. a plain PyTorch loop over ``MultiContrastiveVAE`` (Adam, gradient clipping as ``train()``) on
   batches drawn from an in-memory float32 tensor, for fp32, fp32 + channels_last, bf16 autocast
   and bf16 + channels_last; the settings take turns step by step (``--rounds`` steps each after
   3 warm-up steps), so a machine shared with other jobs slows them alike; median step times;
2. ``model.train()`` (Lightning, the zarr loader, callbacks) with the same settings, one epoch
   each, the settings taking turns ``--repeats`` times; median batch times after the first 3
   batches of each run;
3. the balanced training loader alone and ``get_latent_representation``;
4. with ``--quality``: two models trained fp32 and bf16-mixed (``--quality-cells`` cells,
   ``--quality-epochs`` epochs) scored with :func:`mcvi_ops.metrics.score_synthetic_screen`.

Writes the tables to ``--out``; ``benchmarks/results/training.md`` holds recorded results.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
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

RESULTS = Path(__file__).parent / "results" / "training_run.md"
SETTINGS = {
    "fp32": ("32-true", False),
    "fp32 + channels_last": ("32-true", True),
    "bf16-mixed": ("bf16-mixed", False),
    "bf16-mixed + channels_last": ("bf16-mixed", True),
}


class BatchTimer(pl.Callback):
    """Wall time and cells of every training batch (data loading included)."""

    def __init__(self) -> None:
        self.records: list[tuple[float, int]] = []
        self._last = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.records.append((now - self._last, len(batch["X"])))
        self._last = now


def _step(module, optimizer, batch, bf16: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        _, _, loss = module(batch, loss_kwargs={"kl_weight": 1.0})
    optimizer.zero_grad()
    loss.loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 10.0)
    optimizer.step()


def plain_loop(module, crops, codes, batch_size, rounds) -> dict[str, float]:
    """Cells/s of each setting, the settings taking turns step by step."""
    x = torch.as_tensor(crops, dtype=torch.float32)
    p = torch.as_tensor(codes).unsqueeze(-1)
    runs = {}
    for name, (precision, channels_last) in SETTINGS.items():
        m = copy.deepcopy(module).train()
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        runs[name] = (m, torch.optim.Adam(m.parameters(), lr=1e-3), precision, channels_last)
    rng = np.random.default_rng(0)
    times = {name: [] for name in SETTINGS}
    for step in range(rounds + 3):
        for name, (m, optimizer, precision, channels_last) in runs.items():
            rows = torch.as_tensor(rng.choice(len(x), batch_size, replace=False))
            start = time.perf_counter()
            xb = x[rows]
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            _step(m, optimizer, {"X": xb, "perturbation": p[rows]}, precision == "bf16-mixed")
            if step >= 3:
                times[name].append(time.perf_counter() - start)
    return {name: batch_size / float(np.median(t)) for name, t in times.items()}


def train_once(adata, batch_size, precision, channels_last) -> float:
    """Cells/s of one epoch of ``model.train()`` (median batch time after the first 3)."""
    scvi.settings.seed = 0
    model = MCVAE(adata)
    timer = BatchTimer()
    model.train(
        max_epochs=1,
        batch_size=batch_size,
        accelerator="cpu",
        precision=precision,
        channels_last=channels_last,
        early_stopping=False,
        enable_progress_bar=False,
        save_checkpoints=False,
        callbacks=[timer],
    )
    seconds = np.array([s for s, _ in timer.records[3:]])
    return batch_size / float(np.median(seconds))


def loader_throughput(model, batch_size) -> float:
    splitter = model._data_splitter_cls(model.adata_manager, batch_size=batch_size)
    splitter.setup()
    start = time.perf_counter()
    n = sum(len(batch["X"]) for batch in splitter.train_dataloader())
    return n / (time.perf_counter() - start)


def quality(path: Path, n_cells: int, epochs: int, batch_size: int) -> pd.DataFrame:
    """Same-complex average precision of models trained fp32 and bf16-mixed."""
    adata = mcvi_ops.datasets.synthetic_screen(n_cells=n_cells, crop_size=64, seed=0, path=path)
    MCVAE.setup_anndata(adata, perturbation_key="gene_symbol")
    rows = []
    for precision in ("32-true", "bf16-mixed"):
        scvi.settings.seed = 0
        model = MCVAE(adata)
        start = time.perf_counter()
        model.train(
            max_epochs=epochs,
            batch_size=batch_size,
            accelerator="cpu",
            precision=precision,
            enable_progress_bar=False,
            save_checkpoints=False,
        )
        seconds = time.perf_counter() - start
        key = f"X_mcvae_{precision.replace('-', '_')}"
        adata.obsm[key] = model.get_latent_representation(kind="both")
        scores = mcvi_ops.metrics.score_synthetic_screen(adata, use_rep=[key])
        ap = scores.query("metric == 'complex_average_precision'")["value"].iloc[0]
        baseline = scores.query("metric == 'complex_ap_baseline'")["value"].iloc[0]
        f1 = scores.query("metric == 'well_macro_f1'")["value"].iloc[0]
        final = model.history["validation_loss"].iloc[-1, 0]
        rows.append(
            (precision, round(seconds), round(float(final), 1))
            + tuple(round(float(v), 3) for v in (ap, baseline, f1))
        )
        print(rows[-1], flush=True)
    return pd.DataFrame(
        rows,
        columns=[
            "precision",
            "train seconds",
            "final validation loss",
            "same-complex AP",
            "AP baseline",
            "well macro-F1 (controls)",
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=3_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--quality-cells", type=int, default=3_000)
    parser.add_argument("--quality-epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        adata = mcvi_ops.datasets.synthetic_screen(
            n_cells=args.n_cells, crop_size=64, seed=0, path=Path(tmp) / "s.zarr"
        )
        scvi.settings.seed = 0
        MCVAE.setup_anndata(adata, perturbation_key="gene_symbol")
        model = MCVAE(adata)
        crops = mcvi_ops.data.get_crops(adata)
        codes = model.adata_manager.get_from_registry("perturbation").reshape(-1)
        plain = plain_loop(model.module, crops, codes, args.batch_size, args.rounds)
        loads.append(os.getloadavg()[0])
        trained = {name: [] for name in SETTINGS}
        for _ in range(args.repeats):
            for name, (precision, channels_last) in SETTINGS.items():
                trained[name].append(train_once(adata, args.batch_size, precision, channels_last))
                loads.append(os.getloadavg()[0])
        loader = loader_throughput(model, args.batch_size)
        model = MCVAE(adata)
        model.is_trained_ = True
        start = time.perf_counter()
        model.get_latent_representation(kind="both", batch_size=1024)
        embed = adata.n_obs / (time.perf_counter() - start)
        table = pd.DataFrame(
            [
                (
                    name,
                    round(plain[name]),
                    round(float(np.median(trained[name]))),
                    " / ".join(str(round(v)) for v in trained[name]),
                    f"{np.median(trained[name]) / plain['fp32']:.2f}",
                )
                for name in SETTINGS
            ],
            columns=[
                "setting",
                "plain loop cells/s",
                "train() cells/s (median)",
                "train() runs",
                "train() / plain fp32",
            ],
        )
        print(table.to_string(index=False), flush=True)
        scores = (
            quality(Path(tmp) / "q.zarr", args.quality_cells, args.quality_epochs, args.batch_size)
            if args.quality
            else None
        )
        loads.append(os.getloadavg()[0])
    text = [
        "# Training throughput (one run)",
        "",
        f"Recorded {machine_line()}; load average (1 min) {min(loads):.1f} to {max(loads):.1f}.",
        "",
        f"`python benchmarks/bench_training.py --n-cells {args.n_cells} --batch-size "
        f"{args.batch_size} --repeats {args.repeats} --rounds {args.rounds}"
        + (" --quality" if args.quality else "")
        + "` (CPU)",
        "",
        markdown_table(table, index=False),
        "",
        f"Training loader alone (zarr, balanced, 0 workers): {loader:,.0f} cells/s. "
        f"get_latent_representation: {embed:,.0f} cells/s.",
        "",
    ]
    if scores is not None:
        text += [
            f"Quality: {args.quality_cells} cells, {args.quality_epochs} epochs, seed 0.",
            "",
            markdown_table(scores, index=False),
            "",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
