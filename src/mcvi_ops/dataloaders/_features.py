"""Loaders and splitter of per-cell feature tables, with control/perturbed-balanced batches."""

from __future__ import annotations

import logging

import numpy as np
from scvi.data import AnnDataManager
from scvi.dataloaders import DataSplitter
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from mcvi_ops._constants import CONTROL_CODE, PERTURBATION_KEY

from ._sampler import BalancedChunkSampler, _default_seed

logger = logging.getLogger(__name__)


def _control_mask(adata_manager: AnnDataManager, indices: np.ndarray) -> np.ndarray:
    codes = np.asarray(adata_manager.get_from_registry(PERTURBATION_KEY)).reshape(-1)
    return codes[indices] == CONTROL_CODE


class FeatureDataLoader(DataLoader):
    """Minibatches of rows of a registered feature table, as dicts of tensors.

    Shuffled loaders with ``balanced=True`` hold equally many control and perturbed cells in
    every batch (:class:`BalancedChunkSampler` over one in-memory chunk: a full shuffle each
    epoch, the controls cycled), so the control terms of the objective see controls in every
    step even when they are 1% of the screen. Other loaders read rows in order.

    Parameters
    ----------
    adata_manager
        Manager of the registered AnnData.
    indices
        Rows to load (default: all).
    shuffle
        Shuffle the rows each epoch.
    batch_size
        Rows per batch (even when balanced).
    balanced
        Balance control and perturbed cells in shuffled batches.
    drop_last
        Drop the last, smaller batch of an epoch.
    load_sparse_tensor
        Load sparse features as sparse tensors.
    seed
        Seed of the shuffles (default: ``scvi.settings.seed``).
    distributed_sampler
        Shard the batches across the processes of ``torch.distributed`` (balanced loaders).
    **kwargs
        Passed to :class:`torch.utils.data.DataLoader` (``num_workers``, ``pin_memory``, ...).

    Examples
    --------
    >>> loader = FeatureDataLoader(manager, shuffle=True, batch_size=256)  # doctest: +SKIP
    >>> batch = next(iter(loader))  # doctest: +SKIP
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        indices: np.ndarray | None = None,
        *,
        shuffle: bool = False,
        batch_size: int = 256,
        balanced: bool = True,
        drop_last: bool = False,
        load_sparse_tensor: bool = False,
        seed: int | None = None,
        distributed_sampler: bool = False,
        **kwargs,
    ) -> None:
        n_obs = adata_manager.adata.n_obs
        indices = np.arange(n_obs) if indices is None else np.asarray(indices).reshape(-1)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        self.indices = indices
        dataset = adata_manager.create_torch_dataset(
            indices=indices, load_sparse_tensor=load_sparse_tensor
        )
        positions = np.arange(len(indices))
        if shuffle and (balanced or distributed_sampler):
            # one "chunk": rows of an in-memory table are read at the same cost in any order
            sampler = BalancedChunkSampler(
                positions,
                np.zeros(len(indices), dtype=np.int64),
                is_control=_control_mask(adata_manager, indices) if balanced else None,
                batch_size=batch_size,
                balanced=balanced,
                shuffle=True,
                window_chunks=1,
                drop_last=drop_last,
                seed=_default_seed() if seed is None else seed,
                num_replicas=None if distributed_sampler else 1,
                rank=None if distributed_sampler else 0,
            )
        else:
            order = RandomSampler(positions) if shuffle else SequentialSampler(positions)
            sampler = BatchSampler(order, batch_size=batch_size, drop_last=drop_last)
        kwargs.pop("batch_size", None)
        super().__init__(dataset, sampler=sampler, batch_size=None, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of a balanced sampler (which, with the seed, fixes its shuffle)."""
        if isinstance(self.sampler, BalancedChunkSampler):
            self.sampler.set_epoch(epoch)


class FeatureDataSplitter(DataSplitter):
    """Train/validation split of a feature table, stratified by control status.

    scvi-tools' :class:`~scvi.dataloaders.DataSplitter` with the split given through its public
    ``external_indexing`` hook: controls and perturbed cells are each split with the same
    fractions (seeded), and the loaders are :class:`FeatureDataLoader`.

    Parameters
    ----------
    adata_manager
        Manager of the registered AnnData.
    train_size
        Fraction of cells (of controls and of perturbed cells alike) for training.
    validation_size
        Fraction for validation (default: the rest).
    batch_size
        Cells per batch.
    balanced
        Balance control and perturbed cells in training batches.
    seed
        Seed of the split (default: ``scvi.settings.seed``).
    **kwargs
        Passed to :class:`FeatureDataLoader`.
    """

    data_loader_cls = FeatureDataLoader

    def __init__(
        self,
        adata_manager: AnnDataManager,
        train_size: float = 0.9,
        validation_size: float | None = None,
        *,
        batch_size: int = 256,
        balanced: bool = True,
        seed: int | None = None,
        **kwargs,
    ) -> None:
        if not 0.0 < float(train_size) <= 1.0:
            msg = f"`train_size` must be in (0, 1], got {train_size!r}."
            raise ValueError(msg)
        rest = 1.0 - float(train_size)
        validation = rest if validation_size is None else float(validation_size)
        if not 0.0 <= validation <= rest + 1e-9:
            msg = (
                f"`validation_size` must be in [0, 1 - train_size] = [0, {rest:g}], got "
                f"{validation_size!r}."
            )
            raise ValueError(msg)
        rng = np.random.default_rng(_default_seed() if seed is None else seed)
        control = _control_mask(adata_manager, np.arange(adata_manager.adata.n_obs))
        parts: list[list[np.ndarray]] = [[], [], []]
        for group in (np.flatnonzero(control), np.flatnonzero(~control)):
            group = rng.permutation(group)
            n_train = int(round(len(group) * float(train_size)))
            n_val = min(int(round(len(group) * validation)), len(group) - n_train)
            parts[0].append(group[:n_train])
            parts[1].append(group[n_train : n_train + n_val])
            parts[2].append(group[n_train + n_val :])
        indexing = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        super().__init__(
            adata_manager,
            external_indexing=indexing,
            batch_size=batch_size,
            balanced=balanced,
            seed=seed,
            **kwargs,
        )
