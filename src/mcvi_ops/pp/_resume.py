"""The output folder of :func:`extract_crops`: crop store, AnnData and a resumable run log.

Tiles are written to the store strictly in tile order, through :class:`~mcvi_ops.data.CropWriter`
(the only writer of the store format). Once a tile's crops are on disk, one JSON line describing
the tile is appended to ``extract_log.jsonl`` and flushed: that line commits the tile. A rerun
with the same parameters and table reads the log, reopens the store with ``resume_at`` set to the
committed rows (dropping rows of tiles whose line was never written) and carries on with the next
tile, so the result is identical to an uninterrupted run. The store's lock file is held for the
whole run, so a second run on the same folder (or ``overwrite=True`` in another process) stops
with an error instead of deleting crops being written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mcvi_ops.data import CropWriter
from mcvi_ops.data._files import atomic_path
from mcvi_ops.data._lock import StoreLock
from mcvi_ops.data._store import IncompleteStoreError, open_crops

logger = logging.getLogger(__name__)

STORE_NAME = "crops.zarr"
ADATA_NAME = "cells.h5ad"
LOG_NAME = "extract_log.jsonl"
LOG_VERSION = 2  # 2: tile records carry source fingerprints, unreadable tiles, nonfinite counts


def table_fingerprint(table: pd.DataFrame, columns: list[str]) -> str:
    """Hash the columns that decide which cells are cropped where, stably across runs."""
    hashed = pd.util.hash_pandas_object(table[columns], index=True).to_numpy()
    digest = hashlib.sha256(hashed.tobytes())
    digest.update(json.dumps([len(table), columns]).encode())
    return digest.hexdigest()


class RunFolder:
    """Owns ``out/``: locks it, creates or resumes the store and the log, commits tiles."""

    def __init__(self, out: str | os.PathLike, header: dict[str, Any], *, overwrite: bool) -> None:
        self.root = Path(out).expanduser().resolve()
        self.store_path = self.root / STORE_NAME
        self.log_path = self.root / LOG_NAME
        self.adata_path = self.root / ADATA_NAME
        self.header = {"kind": "header", "version": LOG_VERSION, **header}
        self.overwrite = overwrite
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = StoreLock(str(self.store_path)).acquire()
        try:
            if overwrite:  # the store itself is replaced by CropWriter(overwrite=True)
                for path in (self.adata_path, self.log_path):
                    path.unlink(missing_ok=True)
            self.records: list[dict[str, Any]] = self._read_log()
        except BaseException:
            self._lock.release()
            raise
        self.resumed = self.log_path.exists()

    def release(self) -> None:
        """Release the store's lock (at the end of the run, finished or not)."""
        self._lock.release()

    # --- setup --------------------------------------------------------------------------
    def _read_log(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            if not self.overwrite and (self.store_path.exists() or self.adata_path.exists()):
                msg = (
                    f"{self.root} already holds crops ({STORE_NAME} or {ADATA_NAME}) but no "
                    f"{LOG_NAME}, so the run cannot be resumed. Pass overwrite=True (--overwrite) "
                    "to replace them, or choose another output folder."
                )
                raise FileExistsError(msg)
            return []
        lines = self.log_path.read_text().splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            header = None
        if header != self.header:
            differing = sorted(
                k
                for k in set(self.header) | set(header or {})
                if (header or {}).get(k) != self.header.get(k)
            )
            msg = (
                f"{self.root} holds an earlier extract_crops run with different settings or a "
                f"different cell table (differs in: {differing}), so it cannot be resumed. Pass "
                "overwrite=True (--overwrite) to start again, or choose another output folder."
            )
            raise FileExistsError(msg)
        records: list[dict[str, Any]] = []
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a line torn by a crash: everything before it is committed
            expected_start = records[-1]["stop"] if records else 0
            if record.get("index") != len(records) or record.get("start") != expected_start:
                break
            records.append(record)
        return records

    @property
    def committed(self) -> int:
        """Number of crops of the committed tiles."""
        return int(self.records[-1]["stop"]) if self.records else 0

    def store_complete(self) -> bool:
        """Whether the store is finished and holds exactly the committed crops."""
        try:
            return open_crops(str(self.store_path)).n_cells == self.committed
        except (FileNotFoundError, IncompleteStoreError, ValueError):
            return False

    def rollback(self, n_tiles: int, reason: str) -> None:
        """Forget committed tiles from ``n_tiles`` on, so they are cropped again."""
        if n_tiles >= len(self.records):
            return
        logger.warning(
            "%s; cropping again from that tile on (%d of %d finished tiles kept).",
            reason,
            n_tiles,
            len(self.records),
        )
        self.records = self.records[:n_tiles]
        self._rewrite_log()

    def open_writer(self, **layout: Any) -> CropWriter:
        """Create the store (fresh run) or reopen it at the committed rows (resumed run).

        ``layout`` holds the :class:`~mcvi_ops.data.CropWriter` arguments (channels, crop size,
        dtype, ...). Non-finite counts of committed tiles are carried over.
        """
        path = str(self.store_path)
        if self.resumed and self.store_path.exists():
            writer = CropWriter(path, resume_at=self.committed, **layout)
            if self.records:
                logger.info(
                    "Resuming in %s: %d tiles (%d crops) already done.",
                    self.root,
                    len(self.records),
                    self.committed,
                )
        else:
            self.records = []
            writer = CropWriter(
                path, attrs={"source": "mcvi_ops.pp.extract_crops"}, overwrite=True, **layout
            )
        for record in self.records:
            writer.add_nonfinite_counts(*record.get("nonfinite", (0, 0)))
        self._rewrite_log()
        self.resumed = True
        return writer

    def _rewrite_log(self) -> None:
        with atomic_path(self.log_path) as tmp, tmp.open("w") as fh:
            for item in (self.header, *self.records):
                fh.write(json.dumps(item) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    # --- running ------------------------------------------------------------------------
    def commit(self, writer: CropWriter, crops: np.ndarray, record: dict[str, Any]) -> None:
        """Append one tile's crops through the writer, flush them, then commit the tile."""
        start = self.committed
        writer.append(crops)
        writer.flush()
        self.commit_record(record, start, start + len(crops))

    def commit_record(self, record: dict[str, Any], start: int, stop: int) -> None:
        """Commit a tile whose rows ``[start, stop)`` are on disk (written by any process)."""
        if start != self.committed:
            msg = f"Tile {record.get('label')} starts at row {start}, expected {self.committed}."
            raise RuntimeError(msg)
        record = {
            "kind": "tile",
            "index": len(self.records),
            "start": start,
            "stop": stop,
            **record,
        }
        # O_NOFOLLOW: a link planted at the log's path is never written through
        flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(self.log_path, flags), "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.records.append(record)
