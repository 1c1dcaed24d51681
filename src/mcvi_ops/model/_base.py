"""Shared machinery of the image models: set-up, data loading, inference, saving and loading."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.model.base import BaseModelClass, VAEMixin
from scvi.utils import setup_anndata_dsp

from mcvi_ops._compat import SETUP_ARGS_KEY
from mcvi_ops._constants import CONTROL_CODE, IMAGE_KEY, INTENSITY_FACTOR_KEY, PERTURBATION_KEY
from mcvi_ops.data._fields import (
    UNKNOWN_CODE,
    BatchField,
    ImageField,
    IntensityFactorField,
    IntensityOption,
    PerturbationField,
)
from mcvi_ops.data._link import UNS_KEY, StoreChangedError, crop_reference, linked_store
from mcvi_ops.dataloaders import InferenceLoader
from mcvi_ops.dataloaders._checks import check_finite_crops
from mcvi_ops.dataloaders._inference import NoCellsLoader

from ._persistence import SafeSaveLoadMixin
from ._train import ImageTrainingMixin

logger = logging.getLogger(__name__)


class BaseImageModel(SafeSaveLoadMixin, ImageTrainingMixin, VAEMixin, BaseModelClass):
    """Base class of models on image crops linked to AnnData rows (not used directly)."""

    _required_field = IMAGE_KEY
    _data_hint = (
        "the AnnData the model was trained on, linked to its crops (its adata.uns['crops'] "
        "points at the crop store), or one with the same set-up"
    )

    _data_loader_cls = InferenceLoader
    #: (show a progress bar, its label), set by `_progress` while an output is computed
    _progress_bar: tuple[bool | None, str] | None = None

    def __init__(self, adata: AnnData | None = None) -> None:
        if adata is None:
            name = type(self).__name__
            msg = (
                f"{name} needs the AnnData of the cells, linked to their crops and set up with "
                f"`mcvi_ops.{name}.setup_anndata(adata, perturbation_key=...)`; to load a saved "
                f"model use `mcvi_ops.{name}.load(path, adata)`."
            )
            raise ValueError(msg)
        super().__init__(adata)

    # --- set-up ---------------------------------------------------------------------------
    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: AnnData,
        perturbation_key: str,
        control_category: str = "nontargeting",
        *,
        batch_key: str | None = None,
        intensity_factor_key: str | None = None,
        uns_key: str = UNS_KEY,
        **kwargs,
    ) -> None:
        """Register the crops, the perturbations, an optional batch and intensity factors.

        Parameters
        ----------
        adata
            Cells linked to their crops with :func:`~mcvi_ops.data.link_crops`.
        perturbation_key
            Column of ``adata.obs`` naming each cell's perturbation (gene or guide).
        control_category
            The category of control cells; it always gets code 0.
        batch_key
            Optional column of a technical batch (e.g. plate and well), fed to the decoder only.
        intensity_factor_key
            Optional key of ``adata.obsm`` holding per-cell, per-channel intensity factors
            (field-of-view illumination times batch gains) from
            :func:`~mcvi_ops.pp.estimate_intensity_factors`; every crop is divided by its factors
            above the dark level before the model sees it, so neither latent can read the
            well or the position in the field of view from the intensities. Recommended for
            screens imaged over many tiles and wells.
        uns_key
            Key of the crop-store reference in ``adata.uns``.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        fields = cls._image_fields(
            adata, perturbation_key, control_category, batch_key, intensity_factor_key, uns_key
        )
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    @staticmethod
    def _image_fields(
        adata: AnnData,
        perturbation_key: str,
        control_category: str,
        batch_key: str | None,
        intensity_factor_key: str | None,
        uns_key: str = UNS_KEY,
    ) -> list:
        """The registry fields of the image models' set-up (a subclass may add its own)."""
        reference = crop_reference(adata, uns_key=uns_key)
        fields = [
            ImageField(IMAGE_KEY, index_key=reference["index_key"], uns_key=uns_key),
            PerturbationField(
                PERTURBATION_KEY, perturbation_key, control_category=control_category
            ),
        ]
        if batch_key is not None:
            fields.append(BatchField(REGISTRY_KEYS.BATCH_KEY, batch_key))
        if intensity_factor_key is not None:
            fields.append(IntensityFactorField(INTENSITY_FACTOR_KEY, intensity_factor_key))
        return fields

    def _image_layout(self) -> tuple[int, tuple[int, int], int, int]:
        stats = self.summary_stats
        n_batch = (
            int(stats.get("n_batch", 0))
            if REGISTRY_KEYS.BATCH_KEY in self.adata_manager.data_registry
            else 0
        )
        return (
            int(stats["n_channels"]),
            (int(stats["crop_height"]), int(stats["crop_width"])),
            int(stats["n_perturbation"]),
            n_batch,
        )

    def _intensity_factors(self) -> np.ndarray | None:
        """The registered intensity factors (cells x channels), or `None`."""
        if INTENSITY_FACTOR_KEY not in self.adata_manager.data_registry:
            return None
        return np.asarray(self.adata_manager.get_from_registry(INTENSITY_FACTOR_KEY))

    def _set_dark_level(self) -> None:
        """Copy the dark level recorded with the intensity factors into the module."""
        if self._being_loaded() or INTENSITY_FACTOR_KEY not in self.adata_manager.data_registry:
            return
        key = self.adata_manager.registry["setup_args"]["intensity_factor_key"]
        dark = np.asarray(self.adata.uns[key]["dark_level"], dtype=np.float32)
        self.module.dark_level.copy_(torch.as_tensor(dark).view(-1, 1, 1))

    def _fit_input_transform(self, *, max_cells: int = 2_000, seed: int = 0) -> None:
        """Fit the arcsinh/scaling statistics of the module's input transform on control cells.

        Crops with NaN/inf pixels raise an error naming the cells; control cells with extreme
        intensities (saturated or corrupt crops) are left out of the statistics.
        """
        if self._being_loaded():
            return  # the saved statistics are loaded next
        controls = np.flatnonzero(self._is_control_cell())
        rng = np.random.default_rng(seed)
        if len(controls) > max_cells:
            controls = np.sort(rng.choice(controls, max_cells, replace=False))
        crop_index = np.asarray(self.adata_manager.get_from_registry(IMAGE_KEY)).reshape(-1)
        store = self._check_store(self.adata_manager)
        crops = store.take(crop_index[controls])
        where = f"among {len(controls)} control cells sampled to scale the inputs"
        check_finite_crops(crops, crop_index[controls], where, self.adata.obs_names, crop_index)
        factors = self._intensity_factors()
        if factors is not None:
            # the module's own correction, so the statistics see the inputs training sees
            with torch.no_grad():
                corrected = self.module.correct_intensity(
                    torch.as_tensor(crops.astype(np.float32, copy=False)).to(self.module.device),
                    torch.as_tensor(factors[controls]).to(self.module.device),
                )
            crops = corrected.cpu().numpy()
        excluded = self.module.transform.fit(crops)
        if excluded.any():
            names = [str(n) for n in self.adata.obs_names[controls[excluded]][:5]]
            logger.warning(
                "%d control cells with extreme intensities (e.g. %s) were left out of the input "
                "scaling; check their crops for saturation or corruption.",
                int(excluded.sum()),
                names,
            )

    def _is_control_cell(self) -> np.ndarray:
        """Boolean mask of the registered cells that are controls."""
        codes = self.adata_manager.get_from_registry(PERTURBATION_KEY)
        return np.asarray(codes).reshape(-1) == CONTROL_CODE

    def _uns_key(self) -> str:
        return self.adata_manager.registry["setup_args"].get("uns_key", UNS_KEY)

    # --- data loading ---------------------------------------------------------------------
    def _validate_anndata(
        self, adata: AnnData | None = None, copy_if_view: bool = True, **kwargs
    ) -> AnnData:
        if (
            adata is not None
            and self.get_anndata_manager(adata) is None
            and self.adata_manager is not None
        ):
            # query data may hold perturbations the model never saw; encoders do not need them
            if adata.is_view:
                adata = adata.copy() if copy_if_view else adata
            self._register_manager_for_instance(
                self.adata_manager.transfer_fields(adata, extend_categories=True, **kwargs)
            )
            return adata
        return super()._validate_anndata(adata, copy_if_view=copy_if_view)

    def setup_query(
        self, adata: AnnData, *, intensity: IntensityOption = "check", copy_if_view: bool = True
    ) -> AnnData:
        """Register new cells (query data) for embedding with this model.

        Outputs such as :meth:`get_latent_representation` register query data themselves with
        the default checks; call this first to choose how crops of another pixel type or
        intensity scale than the training crops are handled.

        Parameters
        ----------
        adata
            Cells linked to crops with the model's channels and crop size.
        intensity
            ``"check"`` refuses crops of another pixel type (uint8 vs uint16, floats) or an
            intensity scale more than 10 times off the training crops' in any channel;
            ``"rescale"`` maps each channel's intensity range (0.1 and 99.9 percentiles)
            linearly onto the training one; ``"as_is"`` uses the values unchanged.
        copy_if_view
            Copy ``adata`` if it is a view (views cannot be registered).

        Returns
        -------
        The registered AnnData (a copy if ``adata`` was a view).

        Examples
        --------
        >>> query = model.setup_query(query, intensity="rescale")  # doctest: +SKIP
        >>> latent = model.get_latent_representation(query)  # doctest: +SKIP
        """
        if adata.is_view:
            adata = adata.copy() if copy_if_view else adata
        manager = self.adata_manager.transfer_fields(
            adata, extend_categories=True, intensity=intensity
        )
        self._register_manager_for_instance(manager)
        return adata

    def _check_store(self, manager: AnnDataManager):
        """The crop store of registered cells, refusing one replaced or shrunk since then."""
        adata = manager.adata
        uns_key = self._uns_key()
        store = linked_store(adata, uns_key=uns_key)  # replaced or shrunk since linking
        state = manager.get_state_registry(IMAGE_KEY)
        registered, current = state.get(ImageField.STORE_ID_KEY), getattr(store, "store_id", None)
        if registered is not None and current is not None and registered != current:
            msg = (
                f"The crop store at {store.url} was replaced after these cells were registered "
                f"with the model (store_id {registered!r}, now {current!r}): its crops may be "
                "other cells. Relink the cells to their crops with `mcvi_ops.data.link_crops`, "
                "then register them again (`setup_anndata` and a new model for training data, "
                "`model.setup_query(adata)` for query cells)."
            )
            raise StoreChangedError(msg)
        return store

    def _make_data_loader(
        self,
        adata: AnnData,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        shuffle: bool = False,
        data_loader_class=None,
        **data_loader_kwargs,
    ):
        manager = self.get_anndata_manager(adata)
        if manager is not None:
            self._check_store(manager)
            if data_loader_class is None or issubclass(data_loader_class, InferenceLoader):
                state = manager.get_state_registry(IMAGE_KEY)
                data_loader_kwargs.setdefault(
                    "intensity_map", state.get(ImageField.INTENSITY_MAP_KEY)
                )
                show, description = self._progress_bar or (None, "Cells")
                data_loader_kwargs.setdefault("progress_bar", show)
                data_loader_kwargs.setdefault("description", description)
                # outputs hold every requested row, also inside a DDP process group (e.g. checks
                # after training); `outputs_on_devices` shards the rows itself
                data_loader_kwargs.setdefault("num_replicas", 1)
                data_loader_kwargs.setdefault("rank", 0)
        return super()._make_data_loader(
            adata, indices, batch_size, shuffle, data_loader_class, **data_loader_kwargs
        )

    @contextlib.contextmanager
    def _progress(self, progress_bar: bool | None, description: str = "Cells") -> Iterator[None]:
        """Loaders made inside show a progress bar as asked (`None`: for long runs)."""
        previous, self._progress_bar = self._progress_bar, (progress_bar, description)
        try:
            yield
        finally:
            self._progress_bar = previous

    # --- outputs shared by the image models -----------------------------------------------
    @torch.inference_mode()
    def get_reconstruction(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        batch_size: int | None = None,
        inverse_transform: bool = False,
        progress_bar: bool | None = None,
    ) -> np.ndarray:
        """Reconstructions of crops from their posterior means (MCVAE: controls with ``s = 0``).

        Parameters
        ----------
        adata
            AnnData with crops of the same channels and size (default: the training data).
        indices
            Rows of ``adata`` (default: all).
        batch_size
            Cells per minibatch.
        inverse_transform
            Return raw-intensity images instead of the model's [-1, 1] scale.
        progress_bar
            Show a progress bar; `None`: for more than 10 minibatches in a terminal or notebook.

        Returns
        -------
        Images of shape (n_cells, n_channels, height, width).
        """
        self.module.eval()

        def images(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
            out = self.module.reconstruct(tensors)
            return self.module.transform.inverse(out) if inverse_transform else out

        self._check_known_batches(adata, indices)
        loader = self._iterate(
            adata, indices, batch_size, progress_bar=progress_bar, description="Reconstructing"
        )
        return self._stack_rows(loader, images)

    # --- inference helpers ----------------------------------------------------------------
    def _iterate(
        self,
        adata: AnnData | None,
        indices: Sequence[int] | None,
        batch_size: int | None,
        *,
        progress_bar: bool | None = None,
        description: str = "Embedding",
    ) -> InferenceLoader:
        """The checked minibatches of ``adata`` (its rows ``indices``) in row order."""
        self._check_if_trained(warn=True)
        adata = self._validate_anndata(adata)
        n_rows = adata.n_obs if indices is None else len(np.asarray(indices).reshape(-1))
        if n_rows == 0:
            # scvi-tools finds no manager for an AnnData without rows (it is falsy); the model's
            # own manager has the same fields
            return NoCellsLoader(self.adata_manager)
        with self._progress(progress_bar, description):
            return self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)

    def _check_known_batches(self, adata: AnnData | None, indices: Sequence[int] | None) -> None:
        """Refuse to decode cells without a batch the model knows: the decoder reads it."""
        adata = self._validate_anndata(adata)
        manager = self.get_anndata_manager(adata)
        if manager is None or REGISTRY_KEYS.BATCH_KEY not in manager.data_registry:
            return
        codes = np.asarray(manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY)).reshape(-1)
        if indices is not None:
            codes = codes[np.asarray(indices, dtype=np.int64).reshape(-1)]
        unknown = int((codes == UNKNOWN_CODE).sum())
        if unknown:
            key = self.adata_manager.registry["setup_args"]["batch_key"]
            batches = list(
                self.adata_manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY).categorical_mapping
            )
            msg = (
                f"{unknown} cells have no batch the model knows in adata.obs[{key!r}] (missing, "
                f"or not one of the training batches {[str(b) for b in batches[:5]]}...): the "
                f"decoder needs the batch to reconstruct them. Set adata.obs[{key!r}] to one of "
                "the training batches for these cells; embedding them "
                "(`get_latent_representation`) needs no batch."
            )
            raise ValueError(msg)

    @staticmethod
    def _stack_rows(
        loader: InferenceLoader, compute: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    ) -> np.ndarray:
        """``compute`` of every minibatch, stacked row by row into one float32 array.

        The rows are written into an array allocated once, so embedding a screen never holds a
        second copy of its embeddings (a list of minibatch results, then their concatenation).
        """
        out: np.ndarray | None = None
        start = 0
        for tensors in loader:
            values = compute(tensors).float().cpu().numpy()
            if out is None:
                out = np.empty((len(loader.indices), *values.shape[1:]), dtype=np.float32)
            out[start : start + len(values)] = values
            start += len(values)
        if out is None or start != len(out):
            msg = f"The data loader gave {start} rows, expected {len(loader.indices)}."
            raise RuntimeError(msg)
        return out

    def _to_images(self, transformed: torch.Tensor, inverse_transform: bool) -> np.ndarray:
        out = self.module.transform.inverse(transformed) if inverse_transform else transformed
        return out.float().cpu().numpy()

    @staticmethod
    def _write_obsm(adata: AnnData, key: str, values: np.ndarray) -> None:
        adata.obsm[key] = values
        logger.info("Wrote adata.obsm[%r] (%d x %d)", key, *values.shape)

    @staticmethod
    def _after_load_setup(adata: AnnData, registry: dict) -> None:
        """Warn when the crop store was rewritten since the model was trained."""
        trained = registry["field_registries"][IMAGE_KEY]["state_registry"]
        reference = crop_reference(adata, uns_key=registry[SETUP_ARGS_KEY].get("uns_key", UNS_KEY))
        old_id, new_id = trained.get(ImageField.STORE_ID_KEY), reference.get("store_id")
        if old_id and new_id and old_id != new_id and trained.get("url") == reference["url"]:
            logger.warning(
                "The crop store at %s was rewritten since the model was trained (store_id %s, "
                "now %s); the model describes the crops that are there now.",
                reference["url"],
                old_id,
                new_id,
            )
