"""The train/validation/test splitter of image crops, stratified by control status."""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
from scvi import settings
from scvi.data import AnnDataManager
from scvi.dataloaders import DataSplitter

from mcvi_ops._constants import CONTROL_CODE, IMAGE_KEY, PERTURBATION_KEY

from ._loader import CropDataLoader
from ._sampler import _default_seed

logger = logging.getLogger(__name__)


def _split_counts(n: int, train_size: float, validation_size: float | None) -> tuple[int, int]:
    """Numbers of train and validation cells of a group of ``n``, rounded as scvi-tools does.

    Training cells round up and validation cells down (``scvi.dataloaders.DataSplitter``'s own
    split), the rest test.
    """
    if n == 0:
        return 0, 0
    n_train = math.ceil(train_size * n)
    n_val = n - n_train if validation_size is None else math.floor(n * validation_size)
    return n_train, n_val


class CropDataSplitter(DataSplitter):
    """Train, validation and test loaders of image crops, split stratified by control status.

    A :class:`scvi.dataloaders.DataSplitter` whose split keeps the screen's ratio of control to
    perturbed cells (given to scvi-tools through its public ``external_indexing`` hook) and whose
    loaders are :class:`CropDataLoader` (``data_loader_cls``).

    Controls and perturbed cells are each split with the same fractions, so every split keeps
    the screen's ratio of control to perturbed cells. The split depends only on ``seed``.

    Parameters
    ----------
    adata_manager
        Manager of an AnnData set up with an :class:`~mcvi_ops.data.ImageField` and (for
        ``balanced=True`` or a stratified split) a perturbation field.
    train_size
        Fraction of cells for training; `None` means 0.9.
    validation_size
        Fraction of cells for validation; by default all cells not used for training.
    shuffle_set_split
        Shuffle before splitting. If `False`, the first cells (in row order) of each group train,
        the next validate and the rest test.
    load_sparse_tensor
        Must stay `False`: crops are dense (an error otherwise).
    pin_memory
        Copy batches into page-locked memory (faster transfers to a GPU); `None`: when the
        attached trainer trains on a CUDA device (without a trainer: when CUDA is available).
    batch_size
        Cells per batch; ``scvi.settings.batch_size`` by default.
    balanced
        Balance control and perturbed cells in every batch (:class:`BalancedChunkSampler`).
    distributed_sampler
        Shard batches across the processes of ``torch.distributed``. When a Lightning trainer with
        more than one process is attached, its world size and rank are used regardless.
    window_chunks
        Number of store chunks whose cells are shuffled together.
    num_workers
        Data-loader worker processes; ``scvi.settings.dl_num_workers`` by default.
    seed
        Seed of the split and of the shuffles; ``scvi.settings.seed`` by default.
    drop_last
        Drop the last, smaller training batch of each epoch.
    image_key
        Registry key of the image field.
    perturbation_key
        Registry key of the perturbation field.
    control_code
        Code of the control category in the perturbation field.
    **kwargs
        Passed to :class:`CropDataLoader` and on to :class:`torch.utils.data.DataLoader`
        (``persistent_workers``, ``prefetch_factor``, ...).

    Notes
    -----
    Under DDP, create the Lightning trainer with ``use_distributed_sampler=False``: the samplers
    shard by rank themselves, and Lightning would otherwise try to replace them.

    Examples
    --------
    >>> splitter = CropDataSplitter(manager, train_size=0.9, batch_size=128)  # doctest: +SKIP
    >>> splitter.setup()  # doctest: +SKIP
    >>> batch = next(iter(splitter.train_dataloader()))  # doctest: +SKIP
    """

    data_loader_cls = CropDataLoader

    def __init__(
        self,
        adata_manager: AnnDataManager,
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        load_sparse_tensor: bool = False,
        pin_memory: bool | None = None,
        *,
        batch_size: int | None = None,
        balanced: bool = True,
        distributed_sampler: bool = False,
        window_chunks: int = 8,
        num_workers: int | None = None,
        seed: int | None = None,
        drop_last: bool = False,
        image_key: str = IMAGE_KEY,
        perturbation_key: str = PERTURBATION_KEY,
        control_code: int = CONTROL_CODE,
        **kwargs,
    ) -> None:
        train_fraction = 0.9 if train_size is None else float(train_size)
        if not 0.0 < train_fraction <= 1.0:
            msg = f"`train_size` must be in (0, 1], got {train_size}."
            raise ValueError(msg)
        if validation_size is not None:
            validation_size = float(validation_size)
            if not 0.0 <= validation_size <= 1.0 - train_fraction + 1e-9:
                msg = (
                    f"`validation_size` must be in [0, 1 - train_size] = "
                    f"[0, {1 - train_fraction:g}], got {validation_size}. Lower `train_size` or "
                    "`validation_size`."
                )
                raise ValueError(msg)
        if load_sparse_tensor:
            msg = (
                "`load_sparse_tensor=True` does not apply to image crops, which are dense; "
                "leave it False."
            )
            raise ValueError(msg)
        self.batch_size = settings.batch_size if batch_size is None else int(batch_size)
        self.balanced = bool(balanced)
        self.seed = _default_seed() if seed is None else int(seed)
        self.perturbation_key = perturbation_key
        self.control_code = control_code
        indexing = self._stratified_split(
            adata_manager, train_fraction, validation_size, shuffle=shuffle_set_split
        )
        with warnings.catch_warnings():
            # scvi-tools warns of a last training batch of 1-2 cells from `settings.batch_size`;
            # our loaders form their own (balanced) batches of `batch_size`
            warnings.filterwarnings("ignore", message="Last batch will have a small size")
            super().__init__(
                adata_manager,
                train_size=train_fraction,
                validation_size=validation_size,
                shuffle_set_split=shuffle_set_split,
                pin_memory=pin_memory,
                external_indexing=indexing,
                drop_last=drop_last,
                **kwargs,
            )
        # scvi-tools fills these in `setup`; they are known (and read) before training
        self.train_idx, self.val_idx, self.test_idx = indexing
        self.distributed_sampler = bool(distributed_sampler)
        self.window_chunks = window_chunks
        self.num_workers = settings.dl_num_workers if num_workers is None else int(num_workers)
        self.drop_last = bool(drop_last)
        self.image_key = image_key
        self._replicas: tuple[int | None, int | None] = (
            (None, None) if self.distributed_sampler else (1, 0)
        )

    def _groups(self, adata_manager: AnnDataManager) -> list[np.ndarray]:
        n_obs = adata_manager.adata.n_obs
        if self.perturbation_key not in adata_manager.data_registry:
            if self.balanced:
                msg = (
                    f"`balanced=True` needs the perturbation field {self.perturbation_key!r}, but "
                    f"the registered keys are {list(adata_manager.data_registry.keys())}. "
                    "Register it or use `balanced=False`."
                )
                raise KeyError(msg)
            return [np.arange(n_obs)]
        codes = np.asarray(adata_manager.get_from_registry(self.perturbation_key))
        is_control = codes.reshape(-1) == self.control_code
        return [np.flatnonzero(is_control), np.flatnonzero(~is_control)]

    def _stratified_split(
        self,
        adata_manager: AnnDataManager,
        train_size: float,
        validation_size: float | None,
        *,
        shuffle: bool,
    ) -> list[np.ndarray]:
        """Sorted train, validation and test rows: controls and perturbed cells split alike."""
        rng = np.random.default_rng(self.seed)
        train, val, test = [], [], []
        for name, positions in zip(
            ("control", "perturbed"), self._groups(adata_manager), strict=False
        ):
            n_train, n_val = _split_counts(len(positions), train_size, validation_size)
            if self.balanced and n_train == 0:
                msg = (
                    f"The training split holds no {name} cells ({len(positions)} {name} cells in "
                    "the data), so balanced batches cannot be formed. Balanced training needs both "
                    "control and perturbed cells; check the perturbation field and `control_code`, "
                    "or use `balanced=False`."
                )
                raise ValueError(msg)
            if shuffle:
                positions = rng.permutation(positions)
            train.append(positions[:n_train])
            val.append(positions[n_train : n_train + n_val])
            test.append(positions[n_train + n_val :])
        return [np.sort(np.concatenate(part)).astype(np.int64) for part in (train, val, test)]

    def setup(self, stage: str | None = None) -> None:
        """Take the split (scvi-tools) and the attached trainer's world size and rank (DDP)."""
        super().setup(stage)
        trainer = getattr(self, "trainer", None)
        world_size = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
        if world_size > 1:
            connector = getattr(trainer, "_accelerator_connector", None)
            if getattr(connector, "use_distributed_sampler", False):
                msg = (
                    f"The trainer runs {world_size} processes with `use_distributed_sampler=True`, "
                    "which would replace the balanced, chunk-aware samplers of CropDataSplitter. "
                    "Create the trainer with `use_distributed_sampler=False` (the samplers shard "
                    "by rank themselves)."
                )
                raise ValueError(msg)
            self._replicas = (world_size, int(trainer.global_rank))
        logger.debug("CropDataSplitter replicas (num_replicas, rank): %s", self._replicas)

    def _loader(
        self, indices: np.ndarray, *, shuffle: bool, drop_last: bool
    ) -> CropDataLoader | None:
        if len(indices) == 0:
            return None
        balanced = self.balanced
        if balanced:
            codes = self.adata_manager.get_from_registry(self.perturbation_key)
            n_control = int((np.asarray(codes).reshape(-1)[indices] == self.control_code).sum())
            if n_control in (0, len(indices)):
                logger.warning(
                    "A split of %d cells holds %s; its batches are not balanced.",
                    len(indices),
                    "no control cells" if n_control == 0 else "only control cells",
                )
                balanced = False
        num_replicas, rank = self._replicas
        pin_memory = self.pin_memory
        if pin_memory is None:
            trainer = getattr(self, "trainer", None)
            device = getattr(trainer, "root_device", None) if trainer is not None else None
            pin_memory = device.type == "cuda" if device is not None else None
        return self.data_loader_cls(
            self.adata_manager,
            indices,
            batch_size=self.batch_size,
            shuffle=shuffle,
            balanced=balanced,
            window_chunks=self.window_chunks,
            drop_last=drop_last,
            seed=self.seed,
            num_workers=self.num_workers,
            image_key=self.image_key,
            perturbation_key=self.perturbation_key,
            control_code=self.control_code,
            num_replicas=num_replicas,
            rank=rank,
            pin_memory=pin_memory,
            **self.data_loader_kwargs,
        )

    def train_dataloader(self) -> CropDataLoader:
        """Make balanced (if ``balanced``), chunk-locally shuffled batches, a new order each epoch."""
        return self._loader(self.train_idx, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> CropDataLoader | None:
        """Make validation batches in row order (the same every epoch); `None` if no cells."""
        return self._loader(self.val_idx, shuffle=False, drop_last=False)

    def test_dataloader(self) -> CropDataLoader | None:
        """Make test batches in row order; `None` if no cells."""
        return self._loader(self.test_idx, shuffle=False, drop_last=False)
