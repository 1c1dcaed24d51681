"""The one place that reaches into scvi-tools' private modules, with the reason for each.

Everything else in the package uses scvi-tools' public API (``scvi.data``, ``scvi.dataloaders``,
``scvi.model.base``, ``scvi.module.base``, ``scvi.train``, ``scvi.nn``). The names below have no
public equivalent; each was checked against scvi-tools 1.4.0, 1.4.1, 1.4.2 (installed and
tested) and 1.4.3, and against 1.5.0.post1 (all define them as used here).
``pyproject.toml`` pins ``scvi-tools>=1.4,<1.5``: before raising the bound, check each name
again (``tests/package/test_compat.py`` fails when one is gone or changed).

Importing this module loads scvi-tools: import it only from modules that already need it (the
models, the data loaders), never from a package ``__init__``.
"""

from __future__ import annotations

import importlib

# The key of the set-up arguments in a model's registry (``registry["setup_args"]``): read to set
# a saved model's AnnData up again on load, and to find the crop store's ``uns`` key.
from scvi.data._constants import _MODEL_NAME_KEY as MODEL_NAME_KEY
from scvi.data._constants import _SETUP_ARGS_KEY as SETUP_ARGS_KEY

# Device selection exactly as scvi-tools' own ``load`` does it (accelerator + device ->
# torch.device), and whether a Lightning strategy shards data itself (DDP): the models' ``load``
# and ``train`` take the same arguments as scvi-tools' and must resolve them the same way.
from scvi.model._utils import parse_device_args, use_distributed_sampler

# File names and keys of a saved model folder (``model.pt``, ``adata.h5ad``, ``attr_dict``, ...):
# our safe loader reads folders that scvi-tools' ``save`` wrote.
from scvi.model.base._constants import SAVE_KEYS

__all__ = [
    "MODEL_NAME_KEY",
    "SAVE_KEYS",
    "SETUP_ARGS_KEY",
    "import_rich_pretty",
    "parse_device_args",
    "use_distributed_sampler",
]


def import_rich_pretty() -> None:
    """Import ``rich.pretty``, which scvi-tools 1.4.0-1.4.2 use without importing it.

    ``view_anndata_setup`` and ``view_setup_args`` call ``rich.pretty.pprint`` after importing
    only ``rich.table``; rich 15 no longer imports ``rich.pretty`` with ``rich``, so in a fresh
    session they fail with an ``AttributeError`` (scvi-tools 1.4.3 imports it itself).
    """
    importlib.import_module("rich.pretty")
