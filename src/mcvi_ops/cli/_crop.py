"""``mcvi-ops crop``: cut single-cell crops out of raw tiles into a crop store and an AnnData."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ._common import add_command

logger = logging.getLogger(__name__)

_DESCRIPTION = """\
Cut a square crop around every cell of a per-cell table out of multichannel tile images, align
the channels, clip each channel's extreme intensities and write the crops to OUT/crops.zarr with
an AnnData of the kept cells in OUT/cells.h5ad. Rerunning an interrupted command resumes it.

--tiles is one of:
  * one TIFF/OME-TIFF file, when every cell comes from one image;
  * a folder of TIFFs: a single image, or files named after the tile key values joined by "_"
    (e.g. A1_12.tif for tile key columns well and tile);
  * a path template naming tile key columns in braces, e.g. 'tiles/{well}/Tile-{tile}.tif'
    (format specs work: 'Tile-{tile:04d}.tif'). Quote it in the shell.
"""


def add_parser(subparsers: Any) -> None:
    """Add the ``crop`` subcommand to an :mod:`argparse` subparsers object.

    .. long function: one flat list of the command's options, in the order ``--help`` shows them.
    """
    parser = add_command(
        subparsers,
        "crop",
        help="cut single-cell crops out of raw tile images",
        description=_DESCRIPTION,
    )
    parser.add_argument(
        "--tiles", required=True, help="tile image file, folder, or path template (see above)"
    )
    parser.add_argument(
        "--cells", required=True, help="per-cell table (.csv, .tsv or .parquet) with centroids"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--channel-names",
        required=True,
        nargs="+",
        help="one name per channel, in channel order (space- or comma-separated)",
    )
    parser.add_argument("--crop-size", type=int, default=100, help="crop side in px (100)")
    parser.add_argument(
        "--resize-to", type=int, default=None, help="resize crops to this side in px (e.g. 64)"
    )
    parser.add_argument(
        "--edge-margin",
        type=int,
        default=None,
        help="drop cells closer than this to a tile edge (default: half the crop size)",
    )
    parser.add_argument(
        "--channel-axis",
        default="first",
        help="'first' for (C, Y, X) tiles, 'last' for (Y, X, C), or an integer (first)",
    )
    parser.add_argument(
        "--preset",
        choices=["auto", "funk", "cellprofiler", "none"],
        default="auto",
        help="column naming of the cell table (auto)",
    )
    parser.add_argument(
        "--tile-key", nargs="+", default=None, help="column(s) identifying each cell's tile"
    )
    parser.add_argument("--y-key", default=None, help="column of centroid rows (y)")
    parser.add_argument("--x-key", default=None, help="column of centroid columns (x)")
    parser.add_argument(
        "--no-align", action="store_true", help="do not align channels to the reference channel"
    )
    parser.add_argument(
        "--reference-channel", default="0", help="index or name of the alignment reference (0)"
    )
    parser.add_argument(
        "--clip",
        nargs=2,
        type=float,
        default=[0.1, 99.9],
        metavar=("LOW", "HIGH"),
        help="clip each channel to these percentiles (0.1 99.9)",
    )
    parser.add_argument("--no-clip", action="store_true", help="do not clip intensities")
    parser.add_argument(
        "--dtype", choices=["uint16", "float32"], default="uint16", help="crop pixel type"
    )
    parser.add_argument(
        "--skip-missing-tiles",
        action="store_true",
        help="drop the cells of tiles without an image instead of stopping",
    )
    parser.add_argument(
        "--on-error",
        choices=["raise", "skip"],
        default="raise",
        help="a tile image that exists but cannot be read: stop (raise) or drop its cells (skip)",
    )
    parser.add_argument(
        "--nonfinite",
        choices=["raise", "zero"],
        default="raise",
        help="NaN/inf pixels in float tiles: stop (raise) or set them to 0 and count them (zero)",
    )
    parser.add_argument("--pixel-size", type=float, default=None, help="pixel size in um")
    parser.add_argument("--n-jobs", type=int, default=1, help="worker processes (-1: all cores)")
    parser.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="crop on a running Dask cluster, e.g. tcp://10.0.0.5:8786 (needs dask.distributed; "
        "workers must see the tiles and OUT at the same paths)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="start again instead of resuming OUT"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _int_or_str(value: str) -> int | str:
    try:
        return int(value)
    except ValueError:
        return value


def _connect(address: str) -> Any:
    """A :class:`distributed.Client` connected to the scheduler at ``address``."""
    try:
        import distributed
    except ImportError as err:
        msg = (
            f"--scheduler {address} needs dask.distributed, which is not installed: "
            "pip install mcvi-ops[distributed]"
        )
        raise ModuleNotFoundError(msg) from err
    return distributed.Client(address)


def run(args: argparse.Namespace) -> int:
    """Run ``mcvi-ops crop`` with parsed arguments; return the exit status."""
    from mcvi_ops.pp import extract_crops

    names = [n for item in args.channel_names for n in item.split(",") if n]
    client = _connect(args.scheduler) if args.scheduler else None
    try:
        adata = extract_crops(
            args.tiles,
            args.cells,
            args.out,
            channel_names=names,
            crop_size=args.crop_size,
            channel_axis=_int_or_str(args.channel_axis),
            align=not args.no_align,
            reference_channel=_int_or_str(args.reference_channel),
            clip_percentiles=None if args.no_clip else tuple(args.clip),
            edge_margin=args.edge_margin,
            resize_to=args.resize_to,
            preset=None if args.preset == "none" else args.preset,
            tile_key=args.tile_key,
            y_key=args.y_key,
            x_key=args.x_key,
            on_missing_tile="skip" if args.skip_missing_tiles else "raise",
            on_error=args.on_error,
            nonfinite=args.nonfinite,
            dtype=args.dtype,
            pixel_size=args.pixel_size,
            n_jobs=args.n_jobs,
            client=client,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    finally:
        if client is not None:
            client.close()  # disconnects; the cluster keeps running
    info = adata.uns["extract_crops"]
    print(
        f"Kept {info['n_kept']} of {info['n_cells_in']} cells from {info['n_tiles']} tiles "
        f"(dropped: {info['n_dropped_edge']} near an edge, {info['n_dropped_missing_tile']} "
        f"without a tile image, {info['n_dropped_unreadable_tile']} in unreadable tiles, "
        f"{info['n_dropped_nan']} with a missing centroid)."
    )
    if info["n_nonfinite_values"]:
        print(
            f"Set {info['n_nonfinite_values']} NaN/inf pixel values to 0 in "
            f"{info['n_nonfinite_cells']} crops."
        )
    print(f"Crops: {adata.uns['crops']['url']}  AnnData: {args.out.rstrip('/')}/cells.h5ad")
    return 0
