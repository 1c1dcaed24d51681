"""GPU readiness check of mcvi-ops: training, loader and embedding throughput, one table.

Driver of ``benchmarks/gpu_check.sh``; three sub-commands share one results file (JSON lines),
so that whatever was measured before a time limit struck still reaches the table:

    python benchmarks/gpu/gpu_check.py bench --results R.jsonl --workdir DIR [--budget 360] [--smoke]
    python benchmarks/gpu/gpu_check.py row --results R.jsonl --check NAME --result TEXT [...]
    python benchmarks/gpu/gpu_check.py table --results R.jsonl [--out table.md]

``bench`` measures, on a simulated screen, in order of importance (each part within the budget
left; parts that no longer fit are reported, not run):

1. ``model.train()`` cells/s at 64 px and 100 px, ``precision="bf16-mixed"``: all of the scvi-tools
   TrainingPlan, Lightning and the chunk-aware zarr loader, timed over a fixed number of steps
   after a warm-up (the first steps start workers, pick cuDNN kernels and compile);
2. the training loader alone at 8 and 16 workers;
3. ``get_latent_representation(kind="salient")`` cells/s;
4. training with ``channels_last`` and with ``torch.compile`` (of the conv stacks) at 64 px, and
   at 100 px with whichever of them helped;

and the peak GPU memory of each part. Without CUDA the GPU parts are reported as skipped;
``--smoke`` runs every part on the CPU at toy sizes instead, to test this script.

``row`` and ``table`` use the standard library only, so they work even if the install failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

TARGET_64PX = 10_000  # training cells/s at 64 px on one H200 (issue 12)
GIB = 1024**3

# the rows of the table, in table order: key -> (check, setting); the bench records the settings
# it used, these are shown for rows it did not run
PLAN = {
    "train64": ("training, 64 px", "bf16-mixed"),
    "train64_cl": ("training, 64 px", "+ channels_last"),
    "train64_compile": ("training, 64 px", "+ torch.compile"),
    "train64_both": ("training, 64 px", "+ channels_last + torch.compile"),
    "train100": ("training, 100 px", "bf16-mixed"),
    "train100_best": ("training, 100 px", "+ what helped at 64 px"),
    "loader8": ("training loader alone, 64 px", "8 workers"),
    "loader16": ("training loader alone, 64 px", "16 workers"),
    "embed64": ("embedding, 64 px", 'get_latent_representation(kind="salient")'),
}


# --- results file -------------------------------------------------------------------------------
def append_row(path: Path, **row) -> None:
    """Add one result to the JSON-lines file (written at once: a later kill keeps it)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress(message: str) -> None:
    print(f"  gpu_check: {message}", flush=True)


# --- bench: data ------------------------------------------------------------------------------
def synthetic_screen_function():
    """The simulator under its new name, or the old one while the move is under way."""
    try:
        from mcvi_ops.datasets import synthetic_screen
    except ImportError:
        from mcvi_ops.data import synthetic_screen
    return synthetic_screen


def crop_data_loader_class():
    try:
        from mcvi_ops.dataloaders import CropDataLoader
    except ImportError:
        from mcvi_ops.data import CropDataLoader
    return CropDataLoader


def make_screen(workdir: Path, *, crop_size: int, n_render: int, n_cells: int, **simulator):
    """A screen of ``n_cells`` cells: ``n_render`` simulated cells repeated.

    The simulator renders a few hundred cells per second on one core; repeating them gives a
    store as large as a timed run needs within seconds, with the same compression and layout.
    """
    import anndata as ad
    import numpy as np
    import pandas as pd

    from mcvi_ops.data import get_crops, link_crops, write_crops

    base = synthetic_screen_function()(
        n_cells=n_render,
        crop_size=crop_size,
        seed=0,
        path=workdir / f"base{crop_size}.zarr",
        overwrite=True,
        **simulator,
    )
    repeats = -(-n_cells // n_render)
    crops = np.concatenate([get_crops(base)] * repeats)[:n_cells]
    genes = np.tile(base.obs["gene_symbol"].astype(str).to_numpy(), repeats)[:n_cells]
    store = write_crops(
        workdir / f"screen{crop_size}.zarr",
        crops,
        channel_names=[f"ch{i}" for i in range(crops.shape[1])],
        overwrite=True,
    )
    obs = pd.DataFrame(
        {"gene_symbol": pd.Categorical(genes)}, index=[f"cell{i}" for i in range(n_cells)]
    )
    adata = ad.AnnData(obs=obs)
    link_crops(adata, store)
    return adata


# --- bench: training --------------------------------------------------------------------------
def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compile_conv_stacks(module) -> int:
    """Compile (in place) every nn.Sequential with convolutions: the encoders' and decoder's
    conv stacks, pure tensor code that compiles without graph breaks."""
    from torch import nn

    convs = (nn.Conv2d, nn.ConvTranspose2d)
    stacks = [
        m
        for m in module.modules()
        if isinstance(m, nn.Sequential) and any(isinstance(c, convs) for c in m.children())
    ]
    for stack in stacks:
        stack.compile()
    return len(stacks)


def make_timer(warmup: int, steps: int, seconds: float, deadline: float):
    """A Lightning callback timing the steps after ``warmup`` and stopping the run when
    ``steps`` were timed, ``seconds`` passed since the warm-up, or the deadline is reached."""
    import lightning.pytorch as pl

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.step, self.cells, self.start, self.end = 0, 0, None, None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.step += 1
            now = time.perf_counter()
            if self.step == warmup:
                sync()
                self.start = time.perf_counter()
            elif self.step > warmup:
                self.cells += len(batch["X"])
                if self.step - warmup >= steps or now - self.start >= seconds:
                    trainer.should_stop = True
            if time.time() >= deadline:
                trainer.should_stop = True

        def on_train_end(self, trainer, pl_module) -> None:
            sync()
            self.end = time.perf_counter()

        def rate(self) -> float | None:
            if self.start is None or self.cells == 0:
                return None
            return self.cells / (self.end - self.start)

    return StepTimer()


def train_rate(adata, args, *, channels_last: bool, compile_: bool, deadline: float):
    """cells/s of ``MCVAE.train`` over timed steps; the trained model."""
    import torch

    from mcvi_ops import MCVAE

    gpu = torch.cuda.is_available() and not args.smoke
    model = MCVAE(adata)
    notes = []
    if channels_last:
        model.module.to(memory_format=torch.channels_last)
    if compile_ and not compile_conv_stacks(model.module):
        notes.append("no conv stack found to compile")
    warmup = args.warmup_steps + (args.compile_warmup_steps if compile_ else 0)
    timer = make_timer(warmup, args.steps, args.step_seconds, deadline)
    workers = args.train_workers
    model.train(
        max_epochs=10_000,  # the timer stops the run
        batch_size=args.batch_size,
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        precision="bf16-mixed",
        num_workers=workers,
        early_stopping=False,
        datasplitter_kwargs={
            "pin_memory": gpu,
            "persistent_workers": workers > 0,  # no restart of the workers every epoch
            "drop_last": True,  # same batch shape every step: no recompilation
        },
        callbacks=[timer],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        benchmark=True,  # cuDNN picks the fastest kernels for the fixed shapes
    )
    if timer.rate() is None:
        notes.append(f"stopped after {timer.step} of {warmup} warm-up steps")
    return timer.rate(), model, notes


# --- bench: loader and embedding ----------------------------------------------------------------
def loader_rate(model, args, workers: int, seconds: float) -> float:
    """cells/s of the balanced, shuffled training loader alone (what ``train`` reads)."""
    import torch

    loader = crop_data_loader_class()(
        model.adata_manager,
        batch_size=args.batch_size,
        shuffle=True,
        balanced=True,
        num_workers=workers,
        seed=0,
        pin_memory=torch.cuda.is_available() and not args.smoke,
        persistent_workers=workers > 0,
    )
    cells, start, epoch = 0, None, 0
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            if start is None:  # the first batch waits for the workers to start
                start = time.perf_counter()
                continue
            cells += len(batch["X"])
            if time.perf_counter() - start >= seconds:
                return cells / (time.perf_counter() - start)
        epoch += 1


def embed_rate(model, args) -> tuple[float, int]:
    import numpy as np

    n = min(model.adata.n_obs, args.embed_cells)
    model.get_latent_representation(indices=np.arange(min(n, 2048)), kind="salient")  # warm-up
    sync()
    start = time.perf_counter()
    latent = model.get_latent_representation(
        indices=np.arange(n), kind="salient", batch_size=args.embed_batch_size
    )
    sync()
    return n / (time.perf_counter() - start), latent.shape[1]


# --- bench: the plan --------------------------------------------------------------------------
def bench(args) -> int:
    results = Path(args.results).resolve()
    deadline = time.time() + args.budget
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.captureWarnings(True)
    for name in ("lightning.pytorch", "lightning.fabric", "scvi", "mcvi_ops"):
        logging.getLogger(name).setLevel(logging.ERROR)

    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name}, {props.total_memory / GIB:.0f} GiB"
    else:
        device = "no CUDA device" + (" (smoke run on CPU, toy sizes)" if args.smoke else "")
    import mcvi_ops

    append_row(
        results,
        kind="info",
        device=device,
        versions=f"torch {torch.__version__}"
        + (f" (CUDA {torch.version.cuda})" if cuda else "")
        + f", mcvi-ops {mcvi_ops.__version__}, Python {sys.version.split()[0]}",
        cpus=os.cpu_count(),
    )
    if not cuda and not args.smoke:
        progress("no CUDA device: GPU benchmarks skipped")
        for key in PLAN:
            append_row(results, kind="bench", key=key, result="skipped (no CUDA)")
        return 0
    if args.smoke:  # toy sizes that exercise every code path on a CPU in a few minutes
        args.n_render, args.n_cells, args.n_render_100, args.n_cells_100 = 200, 600, 100, 300
        args.crop_64, args.crop_100 = 32, 40
        args.warmup_steps, args.compile_warmup_steps, args.steps = 2, 2, 4
        args.batch_size, args.train_workers, args.loader_workers = 32, 1, (1, 2)
        args.loader_seconds, args.embed_cells = 2.0, 600
        simulator = {"n_genes": 6, "n_control_guides": 4}  # so that 100 cells cover every guide
    else:
        simulator = {}
    append_row(
        results,
        kind="note",
        text=(
            f"training: model.train(precision='bf16-mixed', batch_size={args.batch_size}, "
            f"num_workers={args.train_workers}, benchmark=True) with "
            f"{'pin_memory, ' if cuda else ''}persistent workers and drop_last; "
            f"cells/s over at most {args.steps} steps or "
            f"{args.step_seconds:.0f} s after {args.warmup_steps} warm-up steps "
            f"(+{args.compile_warmup_steps} with torch.compile), data loading included"
        ),
    )
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # what training writes to the working directory (logs) goes there too
    sizes = {"64": args.crop_64, "100": args.crop_100}
    state: dict = {"model": None, "screens": {}, "rates": {}}

    def label(key: str) -> str:
        """The check's name with the crop sizes of this run (smaller in a smoke run)."""
        check = PLAN[key][0]
        return check.replace("64 px", f"{sizes['64']} px").replace("100 px", f"{sizes['100']} px")

    def screen(size_key: str):
        if isinstance(state["screens"].get(size_key), Exception):
            raise state["screens"][size_key]  # failed before: do not simulate again
        if size_key not in state["screens"]:
            start = time.perf_counter()
            n_render, n = {
                "64": (args.n_render, args.n_cells),
                "100": (args.n_render_100, args.n_cells_100),
            }[size_key]
            try:
                adata = make_screen(
                    workdir, crop_size=sizes[size_key], n_render=n_render, n_cells=n, **simulator
                )
            except Exception as exc:
                state["screens"][size_key] = exc
                raise
            from mcvi_ops import MCVAE

            MCVAE.setup_anndata(
                adata, perturbation_key="gene_symbol", control_category="nontargeting"
            )
            state["screens"][size_key] = adata
            progress(
                f"screen {sizes[size_key]} px: {n:,} cells ({n_render:,} simulated, repeated) "
                f"in {time.perf_counter() - start:.0f} s"
            )
        return state["screens"][size_key]

    def helped(key: str) -> bool:
        base, other = state["rates"].get("train64"), state["rates"].get(key)
        return base is not None and other is not None and other > 1.03 * base

    def run_train(key: str, size_key: str, channels_last: bool, compile_: bool):
        adata = screen(size_key)
        stop = min(deadline, time.time() + (args.compile_cap if compile_ else args.train_cap))
        rate, model, notes = train_rate(
            adata, args, channels_last=channels_last, compile_=compile_, deadline=stop
        )
        if key == "train64":
            state["model"] = model
        state["rates"][key] = rate
        options = [
            o
            for o, on in (
                ("channels_last", channels_last),
                ("torch.compile (conv stacks)", compile_),
            )
            if on
        ]
        workers = args.train_workers
        setting = (
            f"+ {' + '.join(options)}"
            if options
            else f"bf16-mixed, batch {args.batch_size}, {workers} worker{'s' * (workers != 1)}"
        )
        return {
            "check": f"training, {sizes[size_key]} px",
            "setting": "; ".join([setting, *notes]),
            "value": rate,
            "unit": "cells/s",
            "target": TARGET_64PX if sizes[size_key] == 64 else None,
        }

    def run_loader(workers: int):
        if state["model"] is None:
            from mcvi_ops import MCVAE

            state["model"] = MCVAE(screen("64"))
        rate = loader_rate(state["model"], args, workers, args.loader_seconds)
        return {
            "check": f"training loader alone, {sizes['64']} px",
            "setting": f"{workers} worker{'s' * (workers != 1)}, batch {args.batch_size}",
            "value": rate,
            "unit": "cells/s",
        }

    def run_embed():
        if state["model"] is None:
            return {"result": "not run (needs the trained 64 px model)"}
        rate, dim = embed_rate(state["model"], args)
        n = min(state["model"].adata.n_obs, args.embed_cells)
        return {
            "check": f"embedding, {sizes['64']} px",
            "setting": f'kind="salient" ({dim}-d), {n:,} cells, batch {args.embed_batch_size}',
            "value": rate,
            "unit": "cells/s",
        }

    def run_best_100():
        cl, comp = helped("train64_cl"), helped("train64_compile")
        if not (cl or comp):
            return {"result": "not run: neither option helped at 64 px"}
        return run_train("train100_best", "100", cl, comp)

    def run_both_64():
        if not (helped("train64_cl") and helped("train64_compile")):
            return {"result": "not run: not both options helped alone"}
        return run_train("train64_both", "64", True, True)

    w8, w16 = args.loader_workers
    parts = [  # in order of importance: key, seconds it needs at least, what to run
        ("train64", 30, lambda: run_train("train64", "64", False, False)),
        ("train100", 40, lambda: run_train("train100", "100", False, False)),
        ("loader8", 10, lambda: run_loader(w8)),
        ("loader16", 10, lambda: run_loader(w16)),
        ("embed64", 10, run_embed),
        ("train64_cl", 25, lambda: run_train("train64_cl", "64", True, False)),
        ("train64_compile", 60, lambda: run_train("train64_compile", "64", False, True)),
        ("train64_both", 60, run_both_64),
        ("train100_best", 60, run_best_100),
    ]
    failures = 0
    for key, needs, run in parts:
        left = deadline - time.time()
        if left < needs and not args.smoke:
            result = f"not run: {left:.0f} s left"
            append_row(results, kind="bench", key=key, check=label(key), result=result)
            continue
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            row = run()
        except Exception as exc:  # noqa: BLE001 - one failing part must not hide the others
            failures += 1
            traceback.print_exc()
            message = str(exc).splitlines()[0] if str(exc) else ""
            message = message if len(message) <= 60 else message[:57] + "..."
            row = {"result": f"failed ({type(exc).__name__}: {message}; see the log)"}
        row.setdefault("check", label(key))
        row.update(kind="bench", key=key)
        if not row.get("result", "").startswith("not run"):
            row["seconds"] = time.perf_counter() - start
        if cuda:
            row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        append_row(results, **row)
        shown = f"{row['value']:,.0f} {row['unit']}" if row.get("value") else row.get("result")
        took = f" ({row['seconds']:.0f} s)" if "seconds" in row else ""
        progress(f"{row['check']}, {row.get('setting', PLAN[key][1])}: {shown}{took}")
    return 1 if failures else 0


# --- table ------------------------------------------------------------------------------------
def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]], str, list[str]]:
    header = ["check", "setting", "result", "target", "peak GPU mem", "time"]
    out = []
    for row in rows:
        if row.get("kind") == "status":
            out.append([row["check"], row.get("setting", ""), row["result"], "", "", _secs(row)])
    bench = {row["key"]: row for row in rows if row.get("kind") == "bench"}
    peaks = []
    for key, (check, setting) in PLAN.items():
        row = bench.get(key, {"result": "not reached (time limit)"})
        if row.get("value"):
            result = f"{row['value']:,.0f} {row['unit']}"
        else:
            result = row.get("result") or "no timed steps"
        target = ""
        if row.get("target"):
            met = row.get("value") and row["value"] >= row["target"]
            target = f">= {row['target']:,}: {'met' if met else 'NOT met'}"
        peak = ""
        if "peak_gib" in row:
            peaks.append(row["peak_gib"])
            peak = f"{row['peak_gib']:.1f} GiB"
        out.append(
            [row.get("check", check), row.get("setting", setting), result, target, peak, _secs(row)]
        )
    if peaks:
        out.append(
            ["peak GPU memory", "max over the parts above", f"{max(peaks):.1f} GiB", "", "", ""]
        )
    info = next((r for r in rows if r.get("kind") == "info"), None)
    title = (
        f"{info['device']}; {info['versions']}; {info['cpus']} CPUs"
        if info
        else "device unknown (the benchmark did not start)"
    )
    notes = [r["text"] for r in rows if r.get("kind") == "note"]
    return header, out, title, notes


def _secs(row: dict) -> str:
    return f"{row['seconds']:.0f} s" if row.get("seconds") is not None else ""


def render_text(header, rows) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    rule = "  ".join("-" * w for w in widths)
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)), rule]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def render_markdown(header, rows, title) -> str:
    lines = [
        "# GPU check",
        "",
        f"Recorded {time.strftime('%Y-%m-%d')}: {title}. `benchmarks/gpu_check.sh`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def table(args) -> int:
    header, rows, title, notes = table_rows(read_rows(Path(args.results)))
    print(f"\n{title}\n")
    print(render_text(header, rows))
    for note in notes:
        print(f"\n{note}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        text = render_markdown(header, rows, title)
        Path(args.out).write_text(text + "".join(f"\n{note}\n" for note in notes))
        print(f"\n(markdown table written to {args.out})")
    return 0


def row(args) -> int:
    append_row(
        Path(args.results),
        kind="status",
        check=args.check,
        setting=args.setting,
        result=args.result,
        seconds=args.seconds,
    )
    return 0


# --- command line -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="measure; append rows to --results")
    b.add_argument("--results", required=True, help="JSON-lines file shared with `table`")
    b.add_argument("--workdir", required=True, help="folder for the simulated crop stores")
    b.add_argument("--budget", type=float, default=360, help="seconds for all measurements")
    b.add_argument("--smoke", action="store_true", help="without CUDA: toy sizes on the CPU")
    b.add_argument("--batch-size", type=int, default=256)
    b.add_argument("--train-workers", type=int, default=8)
    b.add_argument("--loader-workers", type=int, nargs=2, default=(8, 16))
    b.add_argument("--crop-64", type=int, default=64, help=argparse.SUPPRESS)
    b.add_argument("--crop-100", type=int, default=100, help=argparse.SUPPRESS)
    b.add_argument("--n-render", type=int, default=4_096, help="simulated cells, 64 px")
    b.add_argument("--n-cells", type=int, default=32_768, help="cells in the 64 px store")
    b.add_argument("--n-render-100", type=int, default=2_048, help="simulated cells, 100 px")
    b.add_argument("--n-cells-100", type=int, default=16_384, help="cells in the 100 px store")
    b.add_argument("--warmup-steps", type=int, default=20, help="untimed first steps")
    b.add_argument("--compile-warmup-steps", type=int, default=20, help="more with compile")
    b.add_argument("--steps", type=int, default=400, help="timed steps at most")
    b.add_argument("--step-seconds", type=float, default=15, help="timed seconds at most")
    b.add_argument("--train-cap", type=float, default=60, help="seconds per eager run at most")
    b.add_argument("--compile-cap", type=float, default=150, help="seconds per compiled run")
    b.add_argument("--loader-seconds", type=float, default=8)
    b.add_argument("--embed-cells", type=int, default=32_768)
    b.add_argument("--embed-batch-size", type=int, default=1024)
    b.set_defaults(func=bench)

    r = sub.add_parser("row", help="append a status row (install, tests) to --results")
    r.add_argument("--results", required=True)
    r.add_argument("--check", required=True)
    r.add_argument("--setting", default="")
    r.add_argument("--result", required=True)
    r.add_argument("--seconds", type=float, default=None)
    r.set_defaults(func=row)

    t = sub.add_parser("table", help="print the table of --results (and write --out)")
    t.add_argument("--results", required=True)
    t.add_argument("--out", default=None, help="also write a markdown table here")
    t.set_defaults(func=table)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
