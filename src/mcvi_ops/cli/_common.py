"""What the sub-commands share: their parser set-up and reading the user's AnnData."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_command(subparsers: Any, name: str, *, help: str, description: str):
    """Add the sub-command ``name`` and return its parser.

    ``description`` is shown as written (line breaks and indented lists kept), so a command can
    lay out what it writes.
    """
    return subparsers.add_parser(
        name,
        help=help,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def read_adata(path: Path, *, linked: bool = True):
    """Read an AnnData file, checking that it exists and, if ``linked``, that its crops exist."""
    import anndata as ad

    if not path.exists():
        msg = f"{str(path)!r} does not exist. Pass the AnnData (.h5ad) file of your cells."
        raise FileNotFoundError(msg)
    if path.suffix == ".zarr" or (path.is_dir() and (path / "zarr.json").exists()):
        adata = ad.read_zarr(path)
    elif path.suffix == ".h5ad":
        adata = ad.read_h5ad(path)
    else:
        msg = f"{str(path)!r} is not an AnnData file; pass a .h5ad (or an AnnData .zarr folder)."
        raise ValueError(msg)
    if linked:
        from mcvi_ops.data import linked_store

        try:
            linked_store(adata)
        except KeyError as err:
            msg = (
                f"{str(path)!r} is not linked to crops ({err.args[0]}). Make it with 'mcvi-ops "
                "crop' or mcvi_ops.io (read_brieflow, read_scportrait, read_crop_folder, "
                "crops_from_array)."
            )
            raise KeyError(msg) from err
        except (FileNotFoundError, OSError, ValueError) as err:
            url = dict(adata.uns["crops"]).get("url")
            msg = (
                f"The crop store {url!r} that {str(path)!r} links to cannot be opened ({err}). "
                "Move it back, or relink with mcvi_ops.data.link_crops."
            )
            raise FileNotFoundError(msg) from err
    return adata


def check_obs_column(adata, column: str, flag: str, path: Path) -> None:
    """Fail with the flag to fix when ``column`` is not in ``adata.obs``."""
    if column not in adata.obs:
        columns = list(adata.obs.columns)
        shown = columns[:15] + (["..."] if len(columns) > 15 else [])
        msg = (
            f"{str(path)!r} has no obs column {column!r}; columns: {shown}. Pass {flag} naming "
            "an existing column."
        )
        raise KeyError(msg)
