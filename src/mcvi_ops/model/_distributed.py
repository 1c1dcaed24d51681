"""Outputs of a model on several devices: each rank embeds its shard, gathered in row order."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from lightning.fabric import Fabric

from mcvi_ops._constants import IMAGE_KEY

if TYPE_CHECKING:
    from anndata import AnnData

    from ._base import BaseImageModel

logger = logging.getLogger(__name__)

#: rows gathered across ranks at a time (bounds the memory of each all-gather)
GATHER_ROWS = 262_144

BatchOutputs = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def shard_bounds(chunks: np.ndarray, num_replicas: int) -> np.ndarray:
    """Bounds of ``num_replicas`` contiguous, non-empty, nearly equal pieces of a row list.

    Each interior bound moves to the nearest place where the store chunk changes (``chunks``:
    chunk of each row, in row order), so ranks seldom decode the same chunk, unless that would
    leave a piece empty.

    Examples
    --------
    >>> shard_bounds(np.arange(10) // 4, 2).tolist()
    [0, 4, 10]
    """
    chunks = np.asarray(chunks).reshape(-1)
    n = len(chunks)
    if num_replicas < 1 or n < num_replicas:
        msg = (
            f"Cannot split {n} cells among {num_replicas} devices: every device needs at least one "
            "cell. Embed more cells or use fewer devices."
        )
        raise ValueError(msg)
    ideal = np.linspace(0, n, num_replicas + 1).round().astype(np.int64)
    changes = np.flatnonzero(np.diff(chunks)) + 1
    bounds = ideal.copy()
    for r in range(1, num_replicas):
        if len(changes):
            at = np.searchsorted(changes, ideal[r])
            candidates = changes[max(at - 1, 0) : at + 1]
            nearest = int(candidates[np.argmin(np.abs(candidates - ideal[r]))])
            # keep every piece non-empty: leave room for the pieces still to come
            if bounds[r - 1] < nearest <= n - (num_replicas - r):
                bounds[r] = nearest
        bounds[r] = min(max(bounds[r], bounds[r - 1] + 1), n - (num_replicas - r))
    return bounds


def _gather_rows(fabric, local: torch.Tensor, sizes: np.ndarray) -> np.ndarray:
    """Every rank's rows (``local`` on each, ``sizes[r]`` rows on rank ``r``), in rank order."""
    if len(local) != sizes[fabric.global_rank]:
        msg = (
            f"Rank {fabric.global_rank} computed {len(local)} rows but its shard holds "
            f"{sizes[fabric.global_rank]}; the loader must read exactly the shard's rows."
        )
        raise RuntimeError(msg)
    if fabric.world_size == 1:
        return local.cpu().numpy()
    n_max = int(sizes.max())
    padded = local.new_zeros((n_max, *local.shape[1:]))
    padded[: len(local)] = local
    pieces = [
        fabric.all_gather(padded[start : start + GATHER_ROWS]).cpu()
        for start in range(0, n_max, GATHER_ROWS)
    ]
    every = torch.cat(pieces, dim=1)  # (world, n_max, ...)
    return torch.cat([every[r, : sizes[r]] for r in range(fabric.world_size)]).numpy()


def outputs_on_devices(
    model: BaseImageModel,
    adata: AnnData | None,
    indices: Sequence[int] | None,
    outputs: BatchOutputs,
    *,
    batch_size: int | None,
    accelerator: str,
    devices: int | list[int] | str,
    strategy: str | None,
    progress_bar: bool | None,
    description: str = "Embedding",
) -> np.ndarray:
    """``outputs`` of every row, computed on several devices with Lightning, in row order.

    A :class:`lightning.fabric.Fabric` runs one process per device; each reads a contiguous,
    chunk-aligned shard of the rows (:func:`shard_bounds`) and the ranks' outputs are gathered
    with ``all_gather`` (in pieces of :data:`GATHER_ROWS` rows), so every rank returns the whole
    array.
    """
    model._check_if_trained(warn=True)
    adata = model._validate_anndata(adata)
    manager = model.get_anndata_manager(adata)
    store = model._check_store(manager)
    n_obs = manager.adata.n_obs
    rows = np.arange(n_obs) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    crop_index = np.asarray(manager.get_from_registry(IMAGE_KEY)).reshape(-1)
    chunks = crop_index[rows] // store.chunk_cells

    fabric = Fabric(
        accelerator=accelerator, devices=devices, strategy="auto" if strategy is None else strategy
    )
    fabric.launch()  # from a script, the "ddp" strategy starts it again for the other ranks
    bounds = shard_bounds(chunks, fabric.world_size)
    rank = fabric.global_rank
    logger.debug(
        "Rank %d of %d embeds rows %d..%d", rank, fabric.world_size, *bounds[rank : rank + 2]
    )
    with model._progress(progress_bar if rank == 0 else False, description):
        # the shard is this rank's already: the loader's sampler must not split it again
        loader = model._make_data_loader(
            adata=adata,
            indices=rows[bounds[rank] : bounds[rank + 1]],
            batch_size=batch_size,
            num_replicas=1,
            rank=0,
        )
    device = model.device
    module = model.module.to(fabric.device).eval()
    try:
        with torch.inference_mode():
            parts = [outputs(module, fabric.to_device(batch)).float() for batch in loader]
        return _gather_rows(fabric, torch.cat(parts), np.diff(bounds))
    finally:
        model.module.to(device)
