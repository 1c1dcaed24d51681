"""The output folder of ``mcvi-ops train``: its lock, its run record and resuming.

``OUT/run.json`` records which screen and options a run trains on and how far it got
(``running``, ``interrupted``, ``finished``), so ``--resume`` continues only the run that wrote
the checkpoints, and a finished run is reported instead of trained again. A lock file in the
folder (``OUT/.mcvi-ops.lock``) keeps a second command from writing the same folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RUN_NAME = "run.json"
LOCK_NAME = ".mcvi-ops.lock"
CHECKPOINTS = ("last.ckpt", "interrupted.ckpt")
#: options that decide the model's layout: a run resumed with other values would mix two runs
SETUP_OPTIONS = ("perturbation_key", "control_category", "batch_key")
#: options the help asks to keep when resuming; other values only warn
TRAINING_OPTIONS = ("batch_size", "seed")


def output_lock(target: Path, *, folder: bool):
    """The lock of an output folder (a file inside it) or file (a file beside it), taken."""
    from mcvi_ops.data._lock import StoreLock

    if folder:
        lock = StoreLock(str(target), what="output folder", path=str(target / LOCK_NAME))
    else:
        lock = StoreLock(str(target), what="output file")
    return lock.acquire()


def _digest(table, extra: list) -> str:
    import pandas as pd

    digest = hashlib.sha256(pd.util.hash_pandas_object(table, index=True).to_numpy().tobytes())
    digest.update(json.dumps(extra).encode())
    return digest.hexdigest()


def screen_fingerprint(adata, columns: list[str], *, features: bool = False) -> dict[str, str]:
    """Hashes of the cells a run trains on (names and crops) and of their labels (``columns``).

    For a feature table (``features``): the cell names and the feature names.
    """
    import pandas as pd

    if features:
        cells = pd.DataFrame({"row": range(adata.n_obs)}, index=adata.obs_names)
        extra = [adata.n_obs, list(map(str, adata.var_names))]
    else:
        from mcvi_ops.data._link import crop_reference

        reference = crop_reference(adata)
        cells = pd.DataFrame(
            {"crop": adata.obs[reference["index_key"]].to_numpy()}, index=adata.obs_names
        )
        extra = [adata.n_obs, str(reference.get("store_id"))]
    labels = pd.DataFrame(
        {c: adata.obs[c].astype(str).to_numpy() for c in columns}, index=adata.obs_names
    )
    return {"cells": _digest(cells, extra), "labels": _digest(labels, columns)}


def read_record(out: Path) -> dict[str, Any] | None:
    """The run record of ``out``, or `None` (no record, or one that cannot be read)."""
    path = out / RUN_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        logger.warning("Ignoring the unreadable run record %s.", path)
        return None
    return record if isinstance(record, dict) else None


def write_record(out: Path, record: dict[str, Any]) -> None:
    """Write the run record atomically."""
    from mcvi_ops.data._files import write_text

    write_text(out / RUN_NAME, json.dumps(record, indent=1) + "\n")


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoints of a run folder that exist."""
    return [folder / name for name in CHECKPOINTS if (folder / name).is_file()]


def clear_checkpoints(folder: Path) -> None:
    """Delete the checkpoints of an earlier run (``--overwrite``), so they cannot be resumed."""
    if not folder.exists():
        return
    aside = folder.with_name(f".{folder.name}.replaced-{uuid.uuid4().hex[:12]}")
    folder.rename(aside)  # one rename: no half-cleared folder is ever seen
    shutil.rmtree(aside, ignore_errors=True)
    logger.info("Removed the checkpoints of the earlier run in %s.", folder)


def check_resumable(
    record: dict[str, Any] | None, fingerprint: dict[str, str], options: dict, out: Path
) -> None:
    """Refuse to resume a run of other cells, other set-up options or other labels."""
    if record is None:
        logger.warning(
            "%s has no run record (%s); cannot check that --resume continues a run of the same "
            "cells.",
            out,
            RUN_NAME,
        )
        return
    screen = record.get("screen") or {}
    if screen.get("cells") != fingerprint["cells"]:
        msg = (
            f"The checkpoints in {str(out)!r} belong to a run on other cells "
            f"({record.get('cells', '?')}, {record.get('n_cells', '?')} cells), not these: "
            "resuming would continue that run's weights on this screen. Pass --overwrite to start "
            "a new run here, or another --out (or the cells of that run with --resume)."
        )
        raise ValueError(msg)
    saved = record.get("options", {})
    differing = {k: (saved.get(k), options[k]) for k in SETUP_OPTIONS if saved.get(k) != options[k]}
    if differing:
        shown = ", ".join(
            f"--{k.replace('_', '-')} {new!r} (run: {old!r})" for k, (old, new) in differing.items()
        )
        msg = (
            f"The run in {str(out)!r} was set up with other options: {shown}. Resume with the "
            "run's options, or pass --overwrite to start a new run."
        )
        raise ValueError(msg)
    if screen.get("labels") != fingerprint["labels"]:
        msg = (
            f"The cells of the run in {str(out)!r} carry other perturbation or batch labels now "
            "than when it was trained; resuming would train on mixed labels. Pass --overwrite to "
            "start a new run with the new labels."
        )
        raise ValueError(msg)
    for key in TRAINING_OPTIONS:
        old = saved.get(key)
        if old is not None and old != options[key]:
            logger.warning(
                "Resuming with --%s %s where the run used %s: the result will differ from an "
                "uninterrupted run.",
                key.replace("_", "-"),
                options[key],
                old,
            )
