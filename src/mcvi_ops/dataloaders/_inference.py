"""The data loader of the models' outputs: checked crops, query intensity maps, progress bars."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from tqdm.auto import tqdm

from mcvi_ops._constants import CROP_INDEX_KEY, IMAGE_KEY
from mcvi_ops._logging import interactive_output

from ._checks import check_finite_batch
from ._loader import CropDataLoader

#: show a progress bar by default when embedding takes more minibatches than this
PROGRESS_MIN_BATCHES = 10


class InferenceLoader(CropDataLoader):
    """A :class:`~mcvi_ops.dataloaders.CropDataLoader` for embedding and reconstructing cells.

    Each minibatch is checked for NaN/inf pixels (an error names the cells), crops of query data
    registered with ``intensity="rescale"`` are mapped onto the training intensity scale, and a
    progress bar counts the cells.

    Parameters
    ----------
    adata_manager
        Manager of the AnnData to read.
    indices
        Row positions to load; all rows if `None`.
    intensity_map
        ``[scale, offset]`` per channel applied to the raw crops (`None`: none).
    progress_bar
        Show a progress bar; `None`: when there are more than 10
        minibatches and the output is a terminal or a notebook (not a log file).
    description
        Label of the progress bar.
    **kwargs
        Passed to :class:`~mcvi_ops.dataloaders.CropDataLoader`.
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        indices: Sequence[int] | np.ndarray | None = None,
        *,
        intensity_map: Sequence[Sequence[float]] | None = None,
        progress_bar: bool | None = None,
        description: str = "Cells",
        **kwargs,
    ) -> None:
        super().__init__(adata_manager, indices, **kwargs)
        self.intensity_map = (
            None if intensity_map is None else torch.as_tensor(intensity_map, dtype=torch.float32)
        )
        if progress_bar is None:
            # in a log file every refresh of the bar would be another line
            progress_bar = len(self) > PROGRESS_MIN_BATCHES and interactive_output()
        self.progress_bar = bool(progress_bar)
        self.description = description
        self._obs_names = np.asarray(adata_manager.adata.obs_names)

    def _check_finite(self, batch: dict[str, torch.Tensor]) -> None:
        check_finite_batch(batch, "to embed", self._obs_names, self.dataset.crop_indices)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        bar = tqdm(
            total=len(self.indices),
            unit="cell",
            desc=self.description,
            disable=not self.progress_bar,
        )
        try:
            for batch in super().__iter__():
                self._check_finite(batch)
                if self.intensity_map is not None:
                    x = batch[REGISTRY_KEYS.X_KEY]
                    scale, offset = self.intensity_map.T.reshape(2, 1, -1, 1, 1)
                    batch[REGISTRY_KEYS.X_KEY] = x * scale + offset
                bar.update(len(batch[REGISTRY_KEYS.X_KEY]))
                yield batch
        finally:
            bar.close()


class NoCellsLoader:
    """Stands in for an :class:`InferenceLoader` over zero cells: one empty minibatch.

    Outputs of zero cells are then arrays with zero rows and the right number of columns (the
    networks run on the empty minibatch), rather than an error from an empty sampler.
    """

    def __init__(self, adata_manager: AnnDataManager) -> None:
        self.indices = np.zeros(0, dtype=np.int64)
        self._manager = adata_manager

    def __len__(self) -> int:
        return 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        manager = self._manager
        height, width = manager.get_state_registry(IMAGE_KEY)["crop_size"]
        n_channels = len(manager.get_state_registry(IMAGE_KEY)["channel_names"])
        batch = {
            REGISTRY_KEYS.X_KEY: torch.zeros((0, n_channels, int(height), int(width))),
            CROP_INDEX_KEY: torch.zeros((0, 1), dtype=torch.int64),
        }
        for key in manager.data_registry:
            if key in (IMAGE_KEY, REGISTRY_KEYS.X_KEY):
                continue
            values = np.asarray(manager.get_from_registry(key))
            columns = values.shape[1] if values.ndim == 2 else 1
            dtype = torch.int64 if values.dtype.kind in "iub" else torch.float32
            batch[key] = torch.zeros((0, columns), dtype=dtype)
        yield batch
