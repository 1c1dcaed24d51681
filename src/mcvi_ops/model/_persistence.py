"""Saving and loading of the package's models: atomic saves, loads that run no code."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

from anndata import AnnData, read_h5ad
from scvi.data import AnnDataManager

from mcvi_ops._compat import (
    MODEL_NAME_KEY,
    SAVE_KEYS,
    SETUP_ARGS_KEY,
    import_rich_pretty,
    parse_device_args,
)

from . import _save_load

logger = logging.getLogger(__name__)


class SafeSaveLoadMixin:
    """``save``/``load`` of scvi-tools models, atomic and safe (for every model of the package).

    A model class sets ``_required_field`` (the registry key a saved set-up must hold) and
    ``_data_hint`` (what the AnnData given to :meth:`load` must be), and may implement
    ``_after_load_setup(adata, registry)`` (checks once ``adata`` is set up again).
    """

    _required_field: str = "X"
    _data_hint: str = "the AnnData the model was trained on (or one with the same set-up)"

    @staticmethod
    def _after_load_setup(adata: AnnData, registry: dict) -> None:
        """Checks of the AnnData once it is set up for loading (none by default)."""

    @staticmethod
    def _being_loaded() -> bool:
        """Whether :meth:`load` is building this model (then fitted statistics are not refitted).

        Statistics fitted on the training data at construction (input scaling, control
        standardisation) come from the saved weights instead.
        """
        return _save_load.LOADING.get()

    def view_anndata_setup(
        self, adata: AnnData | None = None, hide_state_registries: bool = False
    ) -> None:
        """Print how ``adata`` (default: the training data) is set up with the model."""
        import_rich_pretty()
        super().view_anndata_setup(adata, hide_state_registries=hide_state_registries)

    # --- saving and loading ---------------------------------------------------------------
    def save(
        self,
        dir_path: str | os.PathLike,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **kwargs,
    ) -> None:
        """Save the model's weights, set-up and training history to a folder.

        Parameters
        ----------
        dir_path
            Folder to write (created if needed).
        prefix
            Prefix of the file names, to keep several models in one folder (no path
            separators: files never leave ``dir_path``).
        overwrite
            Overwrite an existing folder.
        save_anndata
            Also write the AnnData (``adata.h5ad``, still linked to its crop store), so that
            :meth:`load` needs no AnnData.
        **kwargs
            More arguments of :meth:`scvi.model.base.BaseModelClass.save`.

        Notes
        -----
        The files are written under temporary names and renamed into place once complete, so a
        save that fails part way (disk full, Ctrl-C) leaves the model saved there before
        loadable. Once saved, the checkpoints that ``train()`` wrote to its default folder (under
        ``scvi.settings.logging_dir``) are removed; a ``checkpoint_dir`` you chose is kept.

        Examples
        --------
        >>> model.save("model/", overwrite=True)  # doctest: +SKIP
        >>> model = mcvi_ops.MCVAE.load("model/", adata)  # doctest: +SKIP
        """
        prefix = _save_load.check_prefix(prefix, dir_path) or None
        registry, self.registry_ = self.registry_, _save_load.plain_containers(self.registry_)

        def write(folder: str) -> None:
            super(SafeSaveLoadMixin, self).save(
                folder, prefix=prefix, overwrite=True, save_anndata=save_anndata, **kwargs
            )

        try:
            _save_load.save_atomically(dir_path, write, overwrite=overwrite)
        finally:
            self.registry_ = registry
        self._remove_temporary_checkpoints(dir_path)

    def _remove_temporary_checkpoints(self, saved_to: str | os.PathLike) -> None:
        """Remove the checkpoints ``train()`` wrote to its default folder: the model replaces them.

        A ``checkpoint_dir`` the user chose is never removed (``_temporary_checkpoints`` is only
        set for the default one).
        """
        folder = getattr(self, "_temporary_checkpoints", None)
        if folder is None:
            return
        self._temporary_checkpoints = None
        if not Path(folder).is_dir():
            return
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path(folder).parent.rmdir()  # the run's folder, when nothing else is in it
        logger.info(
            "Removed the checkpoints of training (%s): the model saved to %s replaces them.",
            folder,
            saved_to,
        )

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData | None = None,
        *,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        weights_only: bool = True,
    ):
        """Load a model saved with :meth:`save`, without running code from the folder.

        Parameters
        ----------
        dir_path
            Folder given to :meth:`save`.
        adata
            The AnnData the model was trained on (or one with the same set-up), linked to its
            crops, e.g. ``anndata.read_h5ad("screen.h5ad")``. Default: the ``adata.h5ad`` saved
            in the folder with ``save_anndata=True``.
        accelerator
            ``"auto"``, ``"cpu"``, ``"gpu"``, ...
        device
            Device to load the weights onto.
        prefix
            File-name prefix given to :meth:`save`.
        weights_only
            Refuse files holding anything but tensors, numpy arrays and the training history
            (:class:`~mcvi_ops.model.UnsafeModelFileError`); `False` trusts the file entirely
            (needed for models built with custom network objects).

        Returns
        -------
        The model, with the weights, set-up and history saved.

        Examples
        --------
        >>> model = mcvi_ops.MCVAE.load("model/", adata)  # doctest: +SKIP
        """
        _, _, torch_device = parse_device_args(
            accelerator=accelerator,
            devices=device,
            return_device="torch",
            validate_single_device=True,
        )
        attr_dict, _, state_dict = _save_load.load_saved_files(
            dir_path, prefix=prefix, map_location=torch_device, weights_only=weights_only
        )
        path = Path(dir_path) / f"{prefix or ''}{SAVE_KEYS.MODEL_FNAME}"
        registry = attr_dict.pop("registry_", None)
        saved_class = registry.get(MODEL_NAME_KEY) if isinstance(registry, dict) else None
        if saved_class is not None and saved_class != cls.__name__:
            msg = (
                f"{str(dir_path)!r} holds a {saved_class} model; load it with "
                f"`mcvi_ops.{saved_class}.load`, not `{cls.__name__}.load`."
            )
            raise ValueError(msg)
        registry = _save_load.check_registry(registry, path, image_key=cls._required_field)
        adata = cls._adata_to_load(dir_path, adata, prefix)
        cls.setup_anndata(adata, source_registry=registry, **registry[SETUP_ARGS_KEY])
        cls._after_load_setup(adata, registry)
        model = _save_load.initialize(cls, adata, registry, attr_dict, path)
        pyro_param_store = state_dict.pop("pyro_param_store", None)
        model.module.on_load(model, pyro_param_store=pyro_param_store)
        state_dict = _save_load.match_state_dict(model, state_dict, registry, adata, path)
        model.module.load_state_dict(state_dict)
        model.to_device(torch_device)
        model.module.eval()
        model._validate_anndata(adata)
        return model

    @classmethod
    def _adata_to_load(
        cls, dir_path: str | os.PathLike, adata: AnnData | None, prefix: str | None
    ) -> AnnData:
        if adata is not None:
            if not isinstance(adata, AnnData):
                msg = f"`adata` must be an AnnData, got {type(adata).__name__}."
                raise TypeError(msg)
            return adata
        saved = Path(dir_path) / f"{prefix or ''}{SAVE_KEYS.ADATA_FNAME}"
        if saved.is_file():
            return read_h5ad(saved)
        msg = (
            f"`{cls.__name__}.load` needs {cls._data_hint}: "
            f"`mcvi_ops.{cls.__name__}.load({str(dir_path)!r}, adata)` with e.g. "
            "`adata = anndata.read_h5ad('screen.h5ad')`. The folder holds no "
            f"{SAVE_KEYS.ADATA_FNAME} (save the model with `save_anndata=True` to keep one there)."
        )
        raise ValueError(msg)

    @staticmethod
    def load_registry(
        dir_path: str | os.PathLike, prefix: str | None = None, *, weights_only: bool = True
    ) -> dict:
        """The registry (set-up arguments and field states) saved with a model, read safely.

        ``weights_only=False`` trusts the file entirely (as :meth:`load`).
        """
        return _save_load.load_registry(dir_path, prefix=prefix, weights_only=weights_only)

    @staticmethod
    def view_setup_args(
        dir_path: str | os.PathLike, prefix: str | None = None, *, weights_only: bool = True
    ) -> None:
        """Print the arguments a saved model was set up with (``weights_only`` as :meth:`load`)."""
        import_rich_pretty()
        registry = _save_load.load_registry(dir_path, prefix=prefix, weights_only=weights_only)
        AnnDataManager.view_setup_method_args(registry)
