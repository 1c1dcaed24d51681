"""Running :func:`extract_crops` in one process, in a local process pool, or on a Dask cluster.

In parallel runs the main process never touches pixels. A worker crops a tile and saves the
crops to a spill file (``out/.extract_spill/tile-*.npy``) and returns only counts. The main
process lays the tiles out in tile order, as a single process would, and as soon as the rows of
a chunk are known it asks a worker to assemble that chunk from the spill files, compress it and
write it (:func:`mcvi_ops.data._writer.write_chunk`). Each chunk is written once, by one worker,
with the bytes a single process would write. A tile is committed in the run log once every chunk
holding its rows is on disk, so a crash loses at most the tiles in flight.
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import sys
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mcvi_ops.data._store import open_crops
from mcvi_ops.data._writer import CropWriter, write_chunk

from ._resume import RunFolder
from ._tiles import TileResult, TileTask, process_tile

logger = logging.getLogger(__name__)

SPILL_NAME = ".extract_spill"
Piece = tuple[str | None, int, int]  # spill file (None: rows already in the store), rows lo, hi


def spill_tile(task: TileTask, spill_dir: str) -> TileResult:
    """Crop one tile and save its crops to a spill file (runs in a worker)."""
    result = process_tile(task)
    if result.n_crops:
        path = Path(spill_dir) / f"tile-{task.index:07d}.npy"
        np.save(path, result.crops)
        result.spill = str(path)
    result.crops = None
    return result


def write_pieces(store: str, start: int, pieces: Sequence[Piece]) -> int:
    """Assemble one chunk from spill files (and rows already in the store) and write it."""
    parts = []
    for source, lo, hi in pieces:
        if source is None:
            parts.append(open_crops(store, allow_incomplete=True)[lo:hi])
        else:
            parts.append(np.load(source, mmap_mode="r")[lo:hi])
    data = np.concatenate(parts)
    write_chunk(store, start, data)
    return len(data)


class LocalPool:
    """A process pool with the submit/close interface the runner needs."""

    def __init__(self, n_jobs: int, start_method: str | None) -> None:
        if start_method is None:
            start_method = "fork" if sys.platform.startswith("linux") else "spawn"
        context = multiprocessing.get_context(start_method)
        self._executor = ProcessPoolExecutor(max_workers=n_jobs, mp_context=context)
        self.n_workers = n_jobs

    def submit(self, fn: Callable, *args: Any) -> Future:
        return self._executor.submit(fn, *args)

    def close(self, *, cancel: bool) -> None:
        self._executor.shutdown(wait=True, cancel_futures=cancel)


class DaskPool:
    """Tasks on a :class:`distributed.Client`; its workers must see ``out`` and the tiles."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        self._futures: list[tuple[Callable, Any]] = []

    def submit(self, fn: Callable, *args: Any) -> Any:
        future = self.client.submit(fn, *args, pure=False)
        self._futures.append((fn, future))
        return future

    def close(self, *, cancel: bool) -> None:
        from distributed import wait

        if cancel:  # running chunk writes finish; nothing else starts
            self.client.cancel([f for fn, f in self._futures if fn is not write_pieces])
        wait([f for fn, f in self._futures if fn is write_pieces])


def run_serial(
    tasks: list[TileTask],
    *,
    run: RunFolder,
    writer: CropWriter,
    on_result: Callable[[TileResult], dict[str, Any]],
    bar: Any,
) -> None:
    """Crop tiles one by one in this process, committing each after its rows are on disk."""
    for task in tasks:
        result = process_tile(task)
        record = on_result(result)
        run.commit(writer, result.crops, record)
        bar.update(1)


def run_parallel(
    tasks: list[TileTask],
    *,
    pool: LocalPool | DaskPool,
    run: RunFolder,
    writer: CropWriter,
    on_result: Callable[[TileResult], dict[str, Any]],
    bar: Any,
) -> int:
    """Crop tiles and write chunks on the pool's workers; return the number of crops.

    .. long function: documentation and signature; the body is under 80 lines.
    """
    spill_dir = run.root / SPILL_NAME
    shutil.rmtree(spill_dir, ignore_errors=True)
    spill_dir.mkdir(parents=True)
    size = writer.chunk_cells
    offset = run.committed
    state = {"written": offset // size}  # chunks [0, written) are final on disk
    open_start = state["written"] * size
    pieces: list[Piece] = [(None, open_start, offset)] if offset > open_start else []
    chunks: dict[int, Any] = {}
    waiting: deque[tuple[dict[str, Any], int, int, str | None]] = deque()
    writer.reserve(offset + sum(len(task.positions) for task in tasks))

    def commit_ready(*, block: bool, strict: bool = True) -> None:
        while state["written"] in chunks:
            future = chunks[state["written"]]
            if not block and not future.done():
                break
            try:
                future.result()
            except BaseException:
                if strict:
                    raise
                break
            del chunks[state["written"]]
            state["written"] += 1
        while waiting and waiting[0][2] <= state["written"] * size:
            record, start, stop, spill = waiting.popleft()
            run.commit_record(record, start, stop)
            if spill is not None:
                Path(spill).unlink(missing_ok=True)

    window = 2 * pool.n_workers
    queue = iter(tasks)
    in_flight: deque[Any] = deque()
    failed = True
    try:
        for task in queue:
            in_flight.append(pool.submit(spill_tile, task, str(spill_dir)))
            if len(in_flight) >= window:
                break
        while in_flight:
            result: TileResult = in_flight.popleft().result()
            task = next(queue, None)
            if task is not None:
                in_flight.append(pool.submit(spill_tile, task, str(spill_dir)))
            record = on_result(result)
            start, stop = offset, offset + result.n_crops
            position = start
            while position < stop:
                end = min(stop, open_start + size)
                pieces.append((result.spill, position - start, end - start))
                position = end
                if end == open_start + size:
                    chunks[open_start // size] = pool.submit(
                        write_pieces, writer.url, open_start, pieces
                    )
                    pieces, open_start = [], open_start + size
            offset = stop
            waiting.append((record, start, stop, result.spill))
            commit_ready(block=False)
            bar.update(1)
        if any(source is not None for source, _, _ in pieces):
            chunks[open_start // size] = pool.submit(write_pieces, writer.url, open_start, pieces)
        commit_ready(block=True)
        failed = False
    finally:
        pool.close(cancel=failed)
        if failed:  # keep what finished: those tiles need not be cropped again
            try:
                commit_ready(block=False, strict=False)
            except Exception:  # the error being raised already is the one to report
                logger.debug("Could not commit finished tiles while stopping.", exc_info=True)
        shutil.rmtree(spill_dir, ignore_errors=True)
    return offset
