"""``mcvi-ops evaluate``: score embeddings on known gene relationships and technical covariates."""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path
from typing import Any

from ._common import add_command, check_obs_column, read_adata

logger = logging.getLogger(__name__)

REPORT_NAME = "report.md"
#: Funk et al. 2022 field-of-view geometry (2,960 px tiles): centre within 450 px, edge beyond 1,200
FOV_GEOMETRY = (2960, 450, 1200)
COVARIATES = ("batch", "fov_position", "well_position")

_DESCRIPTION = """\
Evaluate the embeddings of SCREEN (an AnnData with .obsm X_mcvae_salient / X_mcvae_background /
X_mcvae, or X_fmcvae_* of 'train --features', from 'mcvi-ops train' or 'mcvi-ops embed') and
write to OUT:

  known_relationships.csv   cells -> guides -> genes (mcvi_ops.tl.aggregate), then average
                            precision and tail recall of each relationship file
                            (mcvi_ops.metrics.known_relationships); higher is better
  technical_covariates.csv  how well control cells' embeddings predict batch, field-of-view and
                            well position (mcvi_ops.metrics.technical_covariates); lower is better
  *.png                     precision-recall curves, covariate bars, UMAPs
  report.md                 a one-page summary of all of it

Relationship files: pair tables (entity1,entity2; e.g. EFAAR's CORUM.txt, HuMAP.txt), complex
lists (name<TAB>genes) or GMT gene sets. Covariates are derived from obs columns plate, well, tile,
cell_i, cell_j when present (mcvi_ops.pp.derive_covariates), or taken from existing columns
batch, fov_position and well_position.
"""


def add_parser(subparsers: Any) -> None:
    """Add the ``evaluate`` sub-command."""
    parser = add_command(
        subparsers,
        "evaluate",
        help="score embeddings (known relationships, technical covariates) -> CSV, PNG, report",
        description=_DESCRIPTION,
    )
    parser.add_argument("screen", metavar="SCREEN", type=Path, help="AnnData with embeddings")
    parser.add_argument(
        "--relationships",
        nargs="+",
        type=Path,
        required=True,
        metavar="FILE",
        help="known gene relationships: pair tables, complex lists or GMT files",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--use-rep",
        nargs="+",
        default=None,
        metavar="KEY",
        help=(
            "obsm keys to evaluate (default: X_mcvae_salient X_mcvae_background X_mcvae, or "
            "X_fmcvae_* of a feature model)"
        ),
    )
    parser.add_argument(
        "--perturbation-key", default="gene_symbol", help="obs column of genes (gene_symbol)"
    )
    parser.add_argument(
        "--guide-key",
        default="sgRNA",
        help="obs column of guides (sgRNA); without it, cells are averaged per gene directly",
    )
    parser.add_argument(
        "--control-category", default="nontargeting", help="value marking controls (nontargeting)"
    )
    parser.add_argument(
        "--min-pairs",
        type=int,
        default=10,
        help="fewest known pairs among the screen's genes for a file to be scored (10)",
    )
    parser.add_argument(
        "--tile-size",
        type=float,
        default=FOV_GEOMETRY[0],
        help="tile side in px for fov_position; its centre/edge radii scale with it (2960)",
    )
    parser.add_argument(
        "--tile-grid",
        nargs=2,
        type=int,
        default=None,
        metavar=("ROWS", "COLS"),
        help="tile grid of each well, for well_position (row-major tile numbers)",
    )
    parser.add_argument(
        "--umap-cells",
        type=int,
        default=50_000,
        help="UMAPs of at most this many cells, sampled at random (50000); 0: no UMAPs",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier evaluation in OUT"
    )
    parser.set_defaults(func=run)


# --- small helpers ---------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if value != value else f"{value:.3f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A GitHub Markdown table of a list of same-keyed dicts."""
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(row[h]) for h in header) + " |" for row in rows]
    return "\n".join(lines)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from mcvi_ops.data._files import atomic_path

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip("."))
    finally:
        plt.close(fig)
    return path


def _file_label(path: Path) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem)


def relationship_labels(paths: list[Path]) -> dict[str, Path]:
    """A unique, file-name-safe label per relationship file, in the given order.

    A file given twice is scored once; files with the same name in different folders are told
    apart by their folder (``a/CORUM.txt``, ``b/CORUM.txt`` -> ``a_CORUM``, ``b_CORUM``).
    """
    unique: list[Path] = []
    for path in paths:
        if path.resolve() in {p.resolve() for p in unique}:
            logger.warning("Relationship file %s is given twice; scoring it once.", path)
        else:
            unique.append(path)
    stems = [_file_label(p) for p in unique]
    labels: dict[str, Path] = {}
    for path, stem in zip(unique, stems, strict=True):
        label = stem if stems.count(stem) == 1 else f"{_file_label(path.parent)}_{stem}"
        base, k = label, 2
        while label in labels:
            label, k = f"{base}_{k}", k + 1
        labels[label] = path
    return labels


def _write_csv(table, path: Path) -> None:
    from mcvi_ops.data._files import atomic_path

    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


# --- the steps -------------------------------------------------------------------------------
def _relationships(genes, args, reps: list[str], out: Path) -> tuple[Any, list[str], list[Path]]:
    import matplotlib.pyplot as plt
    import pandas as pd

    from mcvi_ops import metrics, pl

    frames, skipped, figures = [], [], []
    for name, path in relationship_labels(list(args.relationships)).items():
        key = f"known_relationships_{name}"
        try:
            frame = metrics.known_relationships(
                genes,
                relationships={name: path},
                use_rep=reps,
                control_category=args.control_category,
                min_pairs=args.min_pairs,
                key_added=key,
            )
        except ValueError as err:
            skipped.append(f"relationships {path.name}: {err}")
            logger.warning("Skipped %s: %s", path, err)
            continue
        frames.append(frame)
        fig, ax = plt.subplots(figsize=(4.5, 4))
        pl.precision_recall(genes, source=name, key=key, ax=ax, show=False)
        figures.append(_save(fig, out / f"precision_recall_{name}.png"))
    table = pd.concat(frames, ignore_index=True) if frames else None
    return table, skipped, figures


def _covariates(adata, args, reps: list[str], out: Path) -> tuple[Any, list[str], list[Path]]:
    import matplotlib.pyplot as plt
    import pandas as pd

    from mcvi_ops import metrics, pl, pp

    notes = []
    obs = adata.obs
    if "well" in obs:
        size, center, edge = FOV_GEOMETRY
        scale = args.tile_size / size
        has_tile = "tile" in obs
        pp.derive_covariates(
            adata,
            tile_size=args.tile_size,
            fov_center_radius=center * scale,
            fov_edge_radius=edge * scale,
            tile_grid=args.tile_grid if has_tile else None,
        )
    controls = (obs[args.perturbation_key].astype(str) == args.control_category).to_numpy()
    chosen = []
    for covariate in COVARIATES:
        if covariate not in adata.obs:
            notes.append(f"covariate {covariate}: not in obs and not derivable from it")
            continue
        counts = adata.obs[covariate][controls].value_counts()
        if int((counts >= 10).sum()) < 2:
            notes.append(
                f"covariate {covariate}: fewer than 2 classes with >= 10 control cells "
                f"({ {str(k): int(v) for k, v in counts.items()} })"
            )
            continue
        chosen.append(covariate)
    if not chosen:
        return None, notes, []
    within = [c for c in ("fov_position", "well_position") if c in chosen] if "batch" in obs else []
    table = metrics.technical_covariates(
        adata,
        use_rep=reps,
        covariates=chosen,
        within_batch=within,
        perturbation_key=args.perturbation_key,
        control_category=args.control_category,
        seed=args.seed,
    )
    fig, ax = plt.subplots(figsize=(1.5 + 1.5 * len(chosen), 4))
    pl.technical_covariates(pd.DataFrame(table), ax=ax, show=False)
    return table, notes, [_save(fig, out / "technical_covariates.png")]


def _model_reps(adata) -> tuple[str, ...]:
    """The salient, background and joint keys of the model whose embeddings ``adata`` holds.

    The image model's (``X_mcvae_*``) when present, else the feature model's (``X_fmcvae_*``).
    """
    from mcvi_ops.cli._train import EMBEDDINGS

    for keys in EMBEDDINGS.values():
        if any(key in adata.obsm for key in keys):
            return keys
    return EMBEDDINGS["MCVAE"]


def _umaps(adata, args, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    import numpy as np

    from mcvi_ops import pl, tl

    reps = [r for r in _model_reps(adata)[:2] if r in adata.obsm]
    if not reps or args.umap_cells <= 0:
        return []
    view = adata
    if adata.n_obs > args.umap_cells:
        rng = np.random.default_rng(args.seed)
        view = adata[np.sort(rng.choice(adata.n_obs, args.umap_cells, replace=False))]
    view = view.copy()
    is_control = view.obs[args.perturbation_key].astype(str) == args.control_category
    view.obs["cells"] = np.where(is_control, "control", "perturbed")
    tl.umaps(view, use_rep=reps)
    colors = ["cells"]
    if "batch" in view.obs and view.obs["batch"].nunique() > 1:
        colors.append("batch")
    figures = []
    for color in colors:
        fig, axs = plt.subplots(1, len(reps), figsize=(4.6 * len(reps), 4.2), squeeze=False)
        pl.salient_background(
            view, color=color, reps=reps, axs=list(axs[0]), frameon=False, show=False
        )
        figures.append(_save(fig, out / f"umap_{color}.png"))
    return figures


def _relationship_rows(table) -> list[dict[str, Any]]:
    """One row per representation and source: average precision and tail recalls."""
    shown = [
        m for m in table["metric"].unique() if re.fullmatch(r"average_precision|recall_[\d.]+", m)
    ]
    rows = []
    for (rep, source), group in table.groupby(["representation", "source"], sort=False):
        by_metric = group.set_index("metric")
        entry = {"representation": rep, "source": source}
        for metric in shown:
            label = (
                "average precision"
                if metric == "average_precision"
                else (f"recall ({metric[7:]}% tails)")
            )
            value, baseline = by_metric.loc[metric, ["value", "baseline"]]
            entry[label] = f"{value:.3f} ({baseline:.3f})"
        entry["genes"] = int(group["n_genes"].iloc[0])
        entry["pairs"] = int(group["n_pairs"].iloc[0])
        rows.append(entry)
    return rows


def _report(adata, args, reps, genes, relationships, covariates, skipped, figures) -> str:
    from mcvi_ops import __version__

    obs = adata.obs
    is_control = obs[args.perturbation_key].astype(str) == args.control_category
    lines = [
        "# mcvi-ops evaluation",
        "",
        f"`{args.screen}`: {adata.n_obs:,} cells ({int(is_control.sum()):,} controls), "
        f"{int(genes.n_obs)} perturbed genes; embeddings "
        + ", ".join(f"`{r}` ({adata.obsm[r].shape[1]}-d)" for r in reps)
        + f". mcvi-ops {__version__}, {time.strftime('%Y-%m-%d')}.",
        "",
        "## Known relationships (higher is better)",
        "",
        "Cells are averaged per guide and guides per gene, centred on the controls and scaled "
        "(`mcvi_ops.tl.aggregate`); gene pairs are ranked by cosine similarity "
        "(`mcvi_ops.metrics.known_relationships`). Baselines (random ranking) in brackets.",
        "",
    ]
    if relationships is not None:
        lines += [markdown_table(_relationship_rows(relationships)), ""]
    else:
        lines += ["No relationship file could be scored (see Skipped).", ""]
    lines += [f"![{p.stem}]({p.name})" for p in figures if p.stem.startswith("precision")]
    lines += [
        "",
        "## Technical covariates of control cells (lower is better)",
        "",
        "A balanced logistic regression predicts each covariate from the embeddings of control "
        "cells (`mcvi_ops.metrics.technical_covariates`); chance levels in brackets.",
        "",
    ]
    if covariates is not None:
        rows = [
            {
                "representation": r["representation"],
                "covariate": r["covariate"],
                "AUROC": f"{r['auroc']:.3f} ({r['auroc_chance']:.3f})",
                "macro-F1": f"{r['macro_f1']:.3f} ({r['f1_chance']:.3f})",
                "cells": int(r["n_cells"]),
            }
            for r in covariates.to_dict("records")
        ]
        lines += [markdown_table(rows), "", "![technical covariates](technical_covariates.png)"]
    else:
        lines += ["No covariate could be tested (see Skipped)."]
    umaps = [p for p in figures if p.stem.startswith("umap")]
    if umaps:
        lines += ["", "## Embeddings", ""] + [f"![{p.stem}]({p.name})" for p in umaps]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Evaluate embeddings; see ``mcvi-ops evaluate --help``."""
    from mcvi_ops.data._files import check_writable_folder

    from ._run import output_lock

    check_writable_folder(
        args.out, what="--out", fix="Pass --out naming a folder you can write to."
    )
    lock = output_lock(args.out, folder=True)
    try:
        return _evaluate(args)
    finally:
        lock.release()


def _evaluate(args: argparse.Namespace) -> int:
    out: Path = args.out
    if (out / REPORT_NAME).exists() and not args.overwrite:
        msg = f"{str(out)!r} already holds an evaluation. Pass --overwrite to replace it."
        raise FileExistsError(msg)
    missing = [str(p) for p in args.relationships if not p.is_file()]
    if missing:
        msg = f"Relationship file(s) {missing} do not exist. Check the --relationships paths."
        raise FileNotFoundError(msg)
    adata = read_adata(args.screen, linked=False)

    if args.use_rep is None:
        reps = [r for r in _model_reps(adata) if r in adata.obsm]
        if not reps:
            msg = (
                f"{str(args.screen)!r} holds no MCVAE or FeatureMCVAE embeddings (.obsm "
                "X_mcvae_salient, X_fmcvae_salient, ...). Run 'mcvi-ops train' or 'mcvi-ops "
                "embed' first, or pass --use-rep."
            )
            raise KeyError(msg)
    else:
        reps = list(args.use_rep)
        absent = [r for r in reps if r not in adata.obsm]
        if absent:
            msg = (
                f"{str(args.screen)!r} has no .obsm {absent}; it has {list(adata.obsm)}. Fix "
                "--use-rep."
            )
            raise KeyError(msg)
    check_obs_column(adata, args.perturbation_key, "--perturbation-key", args.screen)
    guide_key = args.guide_key
    if guide_key not in adata.obs:
        logger.info("No obs column %r; averaging cells per gene directly.", guide_key)
        guide_key = args.perturbation_key

    import matplotlib

    matplotlib.use("Agg")

    from mcvi_ops import tl
    from mcvi_ops.data._files import write_text

    genes = tl.aggregate(
        adata,
        use_rep=reps,
        by=(guide_key, args.perturbation_key),
        control_category=args.control_category,
    )
    relationships, skipped, figures = _relationships(genes, args, reps, out)
    covariates, notes, cov_figures = _covariates(adata, args, reps, out)
    figures += cov_figures + _umaps(adata, args, out)
    written = []
    if relationships is not None:
        _write_csv(relationships, out / "known_relationships.csv")
        written.append("known_relationships.csv")
        best = relationships[relationships["metric"] == "average_precision"]
        for row in best.to_dict("records"):
            print(
                f"{row['representation']} on {row['source']}: average precision "
                f"{row['value']:.3f} (random {row['baseline']:.3f})"
            )
    if covariates is not None:
        _write_csv(covariates, out / "technical_covariates.csv")
        written.append("technical_covariates.csv")
    report = _report(adata, args, reps, genes, relationships, covariates, skipped + notes, figures)
    write_text(out / REPORT_NAME, report)
    for line in skipped + notes:
        print(f"Skipped {line}")
    names = ", ".join(written + [p.name for p in figures])
    print(f"Wrote {out / REPORT_NAME} and {names}.")
    return 0
