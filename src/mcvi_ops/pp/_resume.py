"""The output folder of :func:`extract_crops`: crop store, AnnData and a resumable run log.

Tiles are written to the store strictly in tile order. After a tile's crops are in the store, one
JSON line describing the tile is appended to ``extract_log.jsonl`` and flushed to disk: that line
commits the tile. A rerun with the same parameters and table reads the log, keeps the committed
tiles, cuts the store back to the rows they own (dropping rows of a tile whose line was never
written) and carries on with the next tile, so the result is identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from mcvi_ops.data import CropWriter
from mcvi_ops.data._store import ARRAY_NAME

logger = logging.getLogger(__name__)

STORE_NAME = "crops.zarr"
ADATA_NAME = "cells.h5ad"
LOG_NAME = "extract_log.jsonl"
LOG_VERSION = 1


def table_fingerprint(table: pd.DataFrame, columns: list[str]) -> str:
    """Hash the columns that decide which cells are cropped where, stably across runs."""
    hashed = pd.util.hash_pandas_object(table[columns], index=True).to_numpy()
    digest = hashlib.sha256(hashed.tobytes())
    digest.update(json.dumps([len(table), columns]).encode())
    return digest.hexdigest()


class RunFolder:
    """Owns ``out/``: creates or resumes the store and the log, appends committed tiles."""

    def __init__(self, out: str | os.PathLike, header: dict[str, Any], *, overwrite: bool) -> None:
        self.root = Path(out).expanduser().resolve()
        self.store_path = self.root / STORE_NAME
        self.log_path = self.root / LOG_NAME
        self.adata_path = self.root / ADATA_NAME
        self.header = {"kind": "header", "version": LOG_VERSION, **header}
        if overwrite:
            self._remove_outputs()
        self.records: list[dict[str, Any]] = self._read_log()
        self.resumed = bool(self.records) or self.log_path.exists()

    # --- setup --------------------------------------------------------------------------
    def _remove_outputs(self) -> None:
        for path in (self.store_path, self.adata_path, self.log_path):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def _read_log(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            if self.store_path.exists() or self.adata_path.exists():
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

    def open_store(
        self,
        *,
        n_channels: int,
        crop_size: int,
        channel_names: list[str],
        dtype: np.dtype,
        chunk_cells: int | None,
        pixel_size: float | None,
    ) -> zarr.Array:
        """Create the store (fresh run) or cut it back to the committed rows (resumed run)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.resumed or not self.store_path.exists():
            self.records = []
            CropWriter(
                str(self.store_path),
                n_channels=n_channels,
                crop_size=crop_size,
                channel_names=channel_names,
                dtype=dtype,
                chunk_cells=chunk_cells,
                pixel_size=pixel_size,
                attrs={"source": "mcvi_ops.pp.extract_crops"},
                overwrite=True,
            ).close()
            self._rewrite_log()
        array = zarr.open_group(str(self.store_path), mode="r+")[ARRAY_NAME]
        committed = self.records[-1]["stop"] if self.records else 0
        if array.shape[0] < committed:
            msg = (
                f"The crop store {self.store_path} has {array.shape[0]} rows but its log commits "
                f"{committed}; it was changed outside extract_crops. Pass overwrite=True."
            )
            raise RuntimeError(msg)
        self._truncate(array, committed)
        self._rewrite_log()
        if self.records:
            logger.info(
                "Resuming in %s: %d tiles (%d crops) already done.",
                self.root,
                len(self.records),
                committed,
            )
        return array

    @staticmethod
    def _truncate(array: zarr.Array, n_rows: int) -> None:
        """Cut the array to ``n_rows``, leaving no stale rows inside the last partial chunk."""
        if array.shape[0] == n_rows:
            return
        chunk = int(array.chunks[0])
        chunk_start = (n_rows // chunk) * chunk
        tail = array[chunk_start:n_rows]
        array.resize((chunk_start, *array.shape[1:]))  # drops the partial chunk entirely
        array.resize((n_rows, *array.shape[1:]))
        if len(tail):
            array[chunk_start:n_rows] = tail

    def _rewrite_log(self) -> None:
        tmp = self.log_path.with_suffix(".tmp")
        with tmp.open("w") as fh:
            for item in (self.header, *self.records):
                fh.write(json.dumps(item) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.log_path)

    # --- running ------------------------------------------------------------------------
    def commit(self, array: zarr.Array, crops: np.ndarray, record: dict[str, Any]) -> None:
        """Append one tile's crops to the store, then commit the tile in the log."""
        start = self.records[-1]["stop"] if self.records else 0
        stop = start + len(crops)
        if len(crops):
            array.resize((stop, *array.shape[1:]))
            array[start:stop] = crops
        record = {
            "kind": "tile",
            "index": len(self.records),
            "start": start,
            "stop": stop,
            **record,
        }
        with self.log_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.records.append(record)
