"""OME-Zarr tiles as brieflow's zarr3 work writes them: an HCS plate per image kind.

``phenotype/aligned_{plate}.zarr/{row}/{col}/{tile}``, each tile a ``TCZYX`` multiscale image
(OME-NGFF 0.5, or 0.4) whose level 0 is read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mcvi_ops.data._files import check_path_value

_WELL = re.compile(r"^([A-Za-z]+)(\d+)$")


def split_well(well: Any) -> tuple[str, str]:
    """Row and column of a well name as brieflow's OME-Zarr layout uses them (``A1`` -> A, 1)."""
    match = _WELL.match(str(well))
    if match is None:
        msg = (
            f"Well {well!r} is not a row letter followed by a column number (like 'A1'), so its "
            "OME-Zarr tile path cannot be built. Pass `images=` as a path template or a callable."
        )
        raise ValueError(msg)
    return match.group(1), match.group(2)


def _ome_attrs(group) -> dict[str, Any]:
    attrs = dict(group.attrs)
    return dict(attrs.get("ome", attrs))  # NGFF 0.5 nests the metadata under "ome"


def read_ome_zarr(path: str | os.PathLike) -> np.ndarray:
    """Level 0 of an OME-Zarr multiscale image as (channels, height, width).

    Time and singleton z axes are dropped, as brieflow's own reader does.
    """
    import zarr

    path = Path(path)
    if path.name == "zarr.json":
        path = path.parent
    if not path.exists():
        msg = f"OME-Zarr image {str(path)!r} does not exist."
        raise FileNotFoundError(msg)
    group = zarr.open_group(str(path), mode="r")
    meta = _ome_attrs(group)
    multiscales = meta.get("multiscales") or [{}]
    datasets = multiscales[0].get("datasets") or [{"path": "0"}]
    level = str(datasets[0].get("path", "0"))
    if level not in group:
        msg = (
            f"OME-Zarr image {str(path)!r} has no level-0 array {level!r}; it does not look like a "
            "multiscale image (OME-NGFF 0.4/0.5)."
        )
        raise ValueError(msg)
    array = np.asarray(group[level][...])
    axes = [a["name"] if isinstance(a, Mapping) else str(a) for a in multiscales[0].get("axes", [])]
    axes = [a.lower() for a in axes] if len(axes) == array.ndim else []
    if not axes:
        axes = list("tczyx"[-array.ndim :]) if array.ndim >= 3 else ["y", "x"]
    for name in ("t", "z"):
        if name in axes:
            axis = axes.index(name)
            if array.shape[axis] != 1:
                msg = (
                    f"OME-Zarr image {str(path)!r} has {array.shape[axis]} planes along "
                    f"{name!r}; expected one. Project it to 2-D first."
                )
                raise ValueError(msg)
            array = np.take(array, 0, axis=axis)
            axes.pop(axis)
    if "c" not in axes:
        array, axes = array[None], ["c", *axes]
    return np.moveaxis(array, [axes.index("c"), axes.index("y"), axes.index("x")], [0, 1, 2])


def ome_zarr_channel_names(path: str | os.PathLike) -> list[str] | None:
    """Channel labels of an OME-Zarr image (``omero.channels[].label``), or `None`."""
    import zarr

    meta = _ome_attrs(zarr.open_group(str(path), mode="r"))
    channels = (meta.get("omero") or {}).get("channels") or []
    labels = [c.get("label") for c in channels if isinstance(c, Mapping)]
    return [str(label) for label in labels] if labels and all(labels) else None


@dataclass(frozen=True)
class OmeZarrTiles:
    """Tile loader for :func:`~mcvi_ops.pp.extract_crops`: (plate, well, tile) -> OME-Zarr image.

    ``template`` names ``{plate}``, ``{well}``, ``{tile}``, ``{row}`` and ``{col}`` (the well
    split into row letter and column number). Picklable, so it works with ``n_jobs > 1``.
    """

    template: str

    def path(self, key: tuple[Any, Any, Any]) -> Path:
        """The image of tile ``key``; values that could lead out of the tile folder are refused."""
        plate, well, tile = key
        row, col = split_well(well)
        fix = "Fix the cell table, or pass `images=` as a callable that finds each tile."
        for name, value in (("plate", plate), ("tile", tile)):
            check_path_value(value, what=f"The {name} {value!r} of tile {key!r}", fix=fix)
        return Path(self.template.format(plate=plate, well=well, tile=tile, row=row, col=col))

    def __call__(self, key: tuple[Any, Any, Any]) -> np.ndarray:
        path = self.path(key)
        if not path.exists():
            raise FileNotFoundError(str(path))
        return read_ome_zarr(path)
