"""Render benchmarks/results/calibration.md from the JSON lines of `calibrate.py`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from _report import markdown_table

SCORES = {
    "AP both": ("mcvae_both/none", "average_precision"),
    "AP salient": ("mcvae_salient/none", "average_precision"),
    "AP background": ("mcvae_background/none", "average_precision"),
    "cons. mAP both": ("mcvae_both/none", "consistency_mAP"),
    "s well F1 ctrl": ("mcvae_salient/none", "batch_macro_f1_controls"),
    "s well F1 all": ("mcvae_salient/none", "batch_macro_f1_all"),
    "s FOV AUROC ctrl": ("mcvae_salient/none", "fov_position_auroc_controls"),
    "s FOV AUROC all": ("mcvae_salient/none", "fov_position_auroc_all"),
    "novelty": ("mcvae/none", "novelty_auroc"),
}
BASELINE_SCORES = {
    "AP": "average_precision",
    "cons. mAP": "consistency_mAP",
    "well F1 ctrl": "batch_macro_f1_controls",
    "well F1 all": "batch_macro_f1_all",
    "FOV AUROC ctrl": "fov_position_auroc_controls",
    "FOV AUROC all": "fov_position_auroc_all",
}


def _settings(record: dict) -> str:
    parts = [f"{k}={v}" for k, v in {**record.get("module", {}), **record.get("train", {})}.items()]
    if record.get("setup") is not None:
        parts.append(f"setup={record['setup']}")
    return ", ".join(parts) or "defaults"


def _curve(record: dict) -> str:
    values = record.get("curves", {}).get("validation_loss") or []
    if not values:
        return ""
    picks = np.unique(np.linspace(0, len(values) - 1, min(5, len(values))).astype(int))
    return " > ".join(f"{values[i]:.4g}" for i in picks)


#: what the runs below showed, written by hand after the study (shown before the tables)
FINDINGS = Path(__file__).parent / "calibration_findings.md"


def write_report(runs: Path, out: Path) -> None:
    records = [json.loads(line) for line in runs.read_text().splitlines() if line.strip()]
    lines = [
        "# Calibration of the mcVAE objective (issue 16)",
        "",
        "Every run of `benchmarks/calibrate.py`, good or bad, in the order they ran. Protocol: the",
        "guides of each gene (and the control guides) are split in halves; the model trains on the",
        "cells of half A and is scored on the cells of half B, guides it never saw. Baselines are",
        "scored on the same B cells. AP: same-complex average precision of gene profiles; cons.",
        "mAP: copairs consistency within complexes; s: the salient latent; leakage chance: well",
        "macro-F1 1/n_wells, FOV AUROC 0.5. Variance ratio: mean per-dimension variance of perturbed",
        "cells' salient posterior means over the background's; active: dimensions with variance",
        "> 0.01. Curves: validation loss, first to last epoch.",
        "",
    ]
    if FINDINGS.exists():
        lines += [FINDINGS.read_text().strip(), ""]
    for screen in dict.fromkeys(r["screen"] for r in records):
        base = [r for r in records if r["screen"] == screen and r["name"] == "baselines"]
        runs_ = [r for r in records if r["screen"] == screen and r["name"] != "baselines"]
        lines += [f"## Screen `{screen}`", ""]
        if base:
            rows = []
            for key, values in base[-1]["heldout"].items():
                rep, norm = key.split("/")
                rows.append(
                    {"baseline": rep, "normalisation": norm}
                    | {c: values.get(m) for c, m in BASELINE_SCORES.items()}
                )
            lines += [
                "### Baselines and controls",
                "",
                markdown_table(pd.DataFrame(rows), index=False),
                "",
            ]
        if not runs_:
            continue
        rows = []
        for r in runs_:
            h = r["heldout"]
            row = {
                "run": r["name"],
                "model": r.get("model", "mcvae"),
                "seed": r["seed"],
                "settings": _settings(r),
                "s": r["train_seconds"],
                "epochs": r["epochs"],
            }
            row |= {c: h.get(rep, {}).get(m) for c, (rep, m) in SCORES.items()}
            row |= {
                "var ratio": round(r["health"]["variance_ratio"], 4),
                "active s": r["health"]["active_salient"],
                "val loss curve": _curve(r),
            }
            rows.append(row)
        frame = pd.DataFrame(rows)
        lines += ["### Runs", "", markdown_table(frame, index=False), ""]
        numeric = [
            "AP both",
            "AP salient",
            "AP background",
            "cons. mAP both",
            "var ratio",
            "novelty",
            "s",
        ]
        summary = frame.groupby("run", sort=False).agg(
            runs=("seed", "size"), **{c: (c, "mean") for c in numeric}
        )
        summary[["AP both sd"]] = frame.groupby("run", sort=False)[["AP both"]].std()
        lines += ["### Mean over seeds", "", markdown_table(summary.round(3)), ""]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
