"""Chunk-aware batch samplers that balance control and perturbed cells."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)

# Separate streams of the per-epoch random generator, so that the perturbed and control orders
# do not depend on each other.
_PERTURBED_STREAM = 0
_CONTROL_STREAM = 1


def _default_seed() -> int:
    from scvi import settings

    seed = settings.seed
    return 0 if seed is None else int(seed)


class _ChunkGroups:
    """Cells of one stream grouped by the store chunk their crop lives in."""

    def __init__(self, positions: np.ndarray, chunks: np.ndarray) -> None:
        self.positions = positions  # in the order given (the sequential order)
        self.chunks = chunks
        self.sorted_cells = np.argsort(chunks, kind="stable")
        _, self.starts, counts = np.unique(
            chunks[self.sorted_cells], return_index=True, return_counts=True
        )
        self.stops = self.starts + counts

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def n_chunks(self) -> int:
        return len(self.starts)

    def local_order(self, rng: np.random.Generator | None, window_chunks: int) -> np.ndarray:
        """Cells (indices into this group) in chunk-window order; ``rng=None``: as given."""
        if rng is None:
            return np.arange(len(self))
        chunk_order = rng.permutation(self.n_chunks)
        pieces = []
        for first in range(0, self.n_chunks, window_chunks):
            window = chunk_order[first : first + window_chunks]
            cells = np.concatenate(
                [self.sorted_cells[self.starts[c] : self.stops[c]] for c in window]
            )
            rng.shuffle(cells)
            pieces.append(cells)
        return np.concatenate(pieces)

    def order(self, rng: np.random.Generator | None, window_chunks: int) -> np.ndarray:
        """Row positions in chunk-window order (``rng=None``: the order given)."""
        return self.positions[self.local_order(rng, window_chunks)]


def _shard(order: np.ndarray, num_replicas: int, rank: int) -> np.ndarray:
    """Contiguous piece ``rank`` of ``num_replicas`` nearly equal pieces of ``order``."""
    bounds = np.linspace(0, len(order), num_replicas + 1).round().astype(int)
    return order[bounds[rank] : bounds[rank + 1]]


def _cycle_to(cells: np.ndarray, size: int) -> np.ndarray:
    """``cells`` repeated in order until it holds ``size`` entries."""
    if len(cells) >= size:
        return cells[:size]
    return np.resize(cells, size)


class BalancedChunkSampler(Sampler[list[int]]):
    """Batches of row positions that balance control and perturbed cells and read chunk by chunk.

    Cells are grouped by the store chunk of their crop. Each epoch the chunks are shuffled,
    ``window_chunks`` consecutive chunks of that order form a window, and the cells of a window are
    shuffled and emitted before the next window starts. A batch therefore touches at most about
    ``2 * window_chunks`` chunks (when a window holds at least a batch of cells), so the store is
    read at close to sequential speed while batches still mix cells from many plates and wells.

    With ``balanced=True`` every batch holds equally many control and perturbed cells
    (``batch_size / 2`` each; the last batch of an epoch may hold fewer of both). One epoch visits
    every perturbed cell exactly once; the control stream is cycled, reshuffled on each pass, to
    fill the control halves. With ``balanced=False`` all cells form one stream visited once per
    epoch (the VAE baseline and inference loaders).

    Parameters
    ----------
    indices
        Row positions (into the AnnData) to sample from.
    chunks
        Store chunk of each row's crop (``crop_index // store.chunk_cells``), same length as
        ``indices``.
    is_control
        Boolean mask, same length as ``indices``: which rows are control cells. Required when
        ``balanced=True``.
    batch_size
        Cells per batch; must be even when ``balanced=True``.
    balanced
        Balance control and perturbed cells within each batch.
    shuffle
        Shuffle chunk-locally each epoch. If `False`, rows are emitted in the order of
        ``indices`` (each stream separately when balanced) and the order is the same every epoch.
    window_chunks
        Number of chunks whose cells are shuffled together.
    drop_last
        Drop the last batch of an epoch if it is smaller than ``batch_size``.
    seed
        Seed of the shuffles; by default ``scvi.settings.seed`` at construction (0 if unset).
        Every replica of a distributed run must use the same seed.
    num_replicas
        Number of distributed processes; by default the world size of ``torch.distributed`` if it
        is initialised when iterating, else 1.
    rank
        Rank of this process; by default the rank of ``torch.distributed`` if initialised, else 0.
    num_workers
        Data-loader worker processes the batches are dealt to when ``shuffle=True`` (see
        Notes); 0 or 1, or ``shuffle=False``: the batches come in the order described above.

    Notes
    -----
    Data-loader workers: a :class:`torch.utils.data.DataLoader` hands the batches of its sampler
    to its workers in turn. With ``num_workers=k > 1`` the epoch's batches are cut into ``k``
    contiguous runs and emitted taking turns (run 0's first batch, run 1's first, ..., run 0's
    second, ...), so each worker reads one run: its own chunk windows, consecutive batches of
    which share chunks that its chunk cache decodes once. The batches of an epoch are the same
    for every ``num_workers``; only their order differs (deterministically). Unshuffled batches
    (validation, embedding) keep their order.

    Distributed runs: the per-epoch order of each stream is the same on every rank (shared seed)
    and is cut into ``num_replicas`` contiguous pieces, so each rank reads its own chunk windows and
    the ranks' perturbed (and control) cells are disjoint; their union is every cell. Ranks with a
    piece one cell shorter repeat their own first cells so that every rank yields the same number of
    batches (DDP waits forever otherwise).

    Examples
    --------
    >>> import numpy as np
    >>> from mcvi_ops.dataloaders import BalancedChunkSampler
    >>> rows = np.arange(100)
    >>> sampler = BalancedChunkSampler(
    ...     rows, rows // 10, is_control=rows % 4 == 0, batch_size=10, window_chunks=2, seed=0
    ... )
    >>> len(sampler)
    15
    >>> len(next(iter(sampler)))
    10
    """

    def __init__(
        self,
        indices: Sequence[int] | np.ndarray,
        chunks: Sequence[int] | np.ndarray,
        *,
        is_control: Sequence[bool] | np.ndarray | None = None,
        batch_size: int = 256,
        balanced: bool = True,
        shuffle: bool = True,
        window_chunks: int = 8,
        drop_last: bool = False,
        seed: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        num_workers: int = 0,
    ) -> None:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        chunks = np.asarray(chunks, dtype=np.int64).reshape(-1)
        if chunks.shape != indices.shape:
            msg = (
                f"`chunks` must give one chunk per row: expected {len(indices)} entries, got "
                f"{len(chunks)}. Pass `crop_index // store.chunk_cells` of the same rows."
            )
            raise ValueError(msg)
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            msg = f"`batch_size` must be a positive integer, got {batch_size!r}."
            raise ValueError(msg)
        batch_size = int(batch_size)
        if int(window_chunks) < 1:
            msg = f"`window_chunks` must be a positive integer, got {window_chunks!r}."
            raise ValueError(msg)
        if len(indices) == 0:
            msg = "Cannot sample from an empty set of cells: `indices` is empty."
            raise ValueError(msg)
        self.batch_size = batch_size
        self.balanced = bool(balanced)
        self.shuffle = bool(shuffle)
        self.window_chunks = int(window_chunks)
        self.drop_last = bool(drop_last)
        self.seed = _default_seed() if seed is None else int(seed)
        if self.seed < 0:
            msg = f"`seed` must be a non-negative integer, got {seed}."
            raise ValueError(msg)
        if isinstance(num_workers, bool) or int(num_workers) != num_workers or num_workers < 0:
            msg = f"`num_workers` must be a non-negative integer, got {num_workers!r}."
            raise ValueError(msg)
        self.num_workers = int(num_workers)
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        if self.balanced:
            self._init_balanced(indices, chunks, is_control)
        else:
            self._all = _ChunkGroups(indices, chunks)

    def _init_balanced(
        self, indices: np.ndarray, chunks: np.ndarray, is_control: Sequence[bool] | None
    ) -> None:
        if self.batch_size < 2 or self.batch_size % 2:
            msg = (
                f"A balanced batch holds equally many control and perturbed cells, so `batch_size` "
                f"must be an even number >= 2, got {self.batch_size}. Use e.g. "
                f"`batch_size={max(2, self.batch_size + self.batch_size % 2)}`."
            )
            raise ValueError(msg)
        if is_control is None:
            msg = "`is_control` is required when `balanced=True`; pass a boolean mask of controls."
            raise ValueError(msg)
        is_control = np.asarray(is_control, dtype=bool).reshape(-1)
        if is_control.shape != indices.shape:
            msg = (
                f"`is_control` must hold one entry per row: expected {len(indices)}, got "
                f"{len(is_control)}."
            )
            raise ValueError(msg)
        n_control = int(is_control.sum())
        n_perturbed = len(indices) - n_control
        if n_control == 0:
            msg = (
                f"The cells to sample hold no control cells ({n_perturbed} perturbed, 0 control), "
                "so balanced batches cannot be formed. Include control cells (perturbation code "
                "`control_code`) in the split, or use `balanced=False`."
            )
            raise ValueError(msg)
        if n_perturbed == 0:
            msg = (
                f"The cells to sample hold no perturbed cells (0 perturbed, {n_control} control), "
                "so balanced batches cannot be formed. Include perturbed cells in the split, or "
                "use `balanced=False`."
            )
            raise ValueError(msg)
        self._controls = _ChunkGroups(indices[is_control], chunks[is_control])
        self._perturbed = _ChunkGroups(indices[~is_control], chunks[~is_control])

    # --- distributed ------------------------------------------------------------------------
    def _replicas(self) -> tuple[int, int]:
        num_replicas, rank = self.num_replicas, self.rank
        initialised = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialised else 1
        if rank is None:
            rank = dist.get_rank() if initialised else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            msg = (
                f"`rank` must lie in [0, num_replicas - 1] with num_replicas >= 1, got "
                f"rank={rank}, num_replicas={num_replicas}."
            )
            raise ValueError(msg)
        return int(num_replicas), int(rank)

    # --- sizes ------------------------------------------------------------------------------
    @property
    def _stream(self) -> _ChunkGroups:
        return self._perturbed if self.balanced else self._all

    @property
    def _per_batch(self) -> int:
        """Cells per batch drawn from the main (perturbed, or all) stream."""
        return self.batch_size // 2 if self.balanced else self.batch_size

    def _cells_per_rank(self, num_replicas: int) -> int:
        return -(-len(self._stream) // num_replicas)

    def __len__(self) -> int:
        num_replicas, _ = self._replicas()
        n, per_batch = self._cells_per_rank(num_replicas), self._per_batch
        return n // per_batch if self.drop_last else -(-n // per_batch)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch, which (with the seed) determines the shuffle; same on every rank."""
        self.epoch = int(epoch)

    # --- iteration --------------------------------------------------------------------------
    def _rng(self, *stream: int) -> np.random.Generator | None:
        if not self.shuffle:
            return None
        return np.random.default_rng([self.seed, self.epoch, *stream])

    def _stream_order(self, num_replicas: int, rank: int) -> np.ndarray:
        if len(self._stream) < num_replicas:
            msg = (
                f"Only {len(self._stream)} {'perturbed ' if self.balanced else ''}cells for "
                f"{num_replicas} distributed processes; every process needs at least one. Use more "
                "cells or fewer devices."
            )
            raise ValueError(msg)
        order = self._stream.order(self._rng(_PERTURBED_STREAM), self.window_chunks)
        piece = _shard(order, num_replicas, rank)
        return _cycle_to(piece, self._cells_per_rank(num_replicas))

    def _control_order(self, size: int, num_replicas: int, rank: int) -> np.ndarray:
        if len(self._controls) < num_replicas:
            msg = (
                f"Only {len(self._controls)} control cells for {num_replicas} distributed "
                "processes; every process needs at least one. Use more control cells or fewer "
                "devices."
            )
            raise ValueError(msg)
        # this rank's controls for the epoch: a contiguous piece of the shared first pass
        first = _shard(
            self._controls.local_order(self._rng(_CONTROL_STREAM, 0), self.window_chunks),
            num_replicas,
            rank,
        )
        pieces = [self._controls.positions[first]]
        if len(first) < size:
            # later passes reshuffle the same cells, so ranks stay disjoint
            own = _ChunkGroups(self._controls.positions[first], self._controls.chunks[first])
            n_pass = -(-size // len(first))
            logger.debug("Cycling %d times through %d control cells.", n_pass, len(first))
            for p in range(1, n_pass):
                pieces.append(own.order(self._rng(_CONTROL_STREAM, p), self.window_chunks))
        return np.concatenate(pieces)[:size]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches()
        if self.num_workers < 2 or not self.shuffle:
            yield from batches
            return
        # k contiguous runs, the longer ones first, so that the DataLoader's turn-taking gives
        # worker j every batch of run j, down to the last round
        k = self.num_workers
        sizes = [len(batches) // k + (j < len(batches) % k) for j in range(k)]
        starts = np.cumsum([0, *sizes])
        runs = [batches[starts[j] : starts[j + 1]] for j in range(k)]
        for i in range(sizes[0]):
            for run in runs:
                if i < len(run):
                    yield run[i]

    def _batches(self) -> list[list[int]]:
        """The epoch's batches in stream order."""
        num_replicas, rank = self._replicas()
        main = self._stream_order(num_replicas, rank)
        per_batch = self._per_batch
        n_batches = len(self)
        main = main[: n_batches * per_batch] if self.drop_last else main
        if self.balanced:
            controls = self._control_order(len(main), num_replicas, rank)
        batches = []
        for b in range(n_batches):
            part = main[b * per_batch : (b + 1) * per_batch]
            if self.balanced:
                part = np.concatenate([controls[b * per_batch : b * per_batch + len(part)], part])
            batches.append(part.tolist())
        return batches
