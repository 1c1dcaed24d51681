from __future__ import annotations

import argparse

import anndata as ad
import numpy as np

from mcvi_ops.cli import _crop
from mcvi_ops.data import get_crops


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mcvi-ops")
    _crop.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_crop_single_image(paths, tmp_path, capsys):
    args = _parse(
        [
            "crop",
            "--tiles",
            str(paths["image"]),
            "--cells",
            str(paths["cells"]),
            "--out",
            str(tmp_path / "out"),
            "--channel-names",
            "DNA,PH3,cellbody",
            "--resize-to",
            "64",
            "--quiet",
        ]
    )
    assert args.func is _crop.run
    assert args.func(args) == 0
    assert "Kept 195 of 289 cells" in capsys.readouterr().out
    adata = ad.read_h5ad(tmp_path / "out" / "cells.h5ad")
    assert get_crops(adata, [0]).shape == (1, 3, 64, 64)
    assert adata.uns["extract_crops"]["preset"] == "cellprofiler"


def test_cli_crop_template_parallel(tiles, tmp_path):
    template, table, _ = tiles
    table.to_csv(tmp_path / "cells.csv", index=False)
    common = ["--cells", str(tmp_path / "cells.csv"), "--channel-names", "DNA", "PH3", "cellbody"]
    args = _parse(
        [
            "crop",
            "--tiles",
            template,
            "--out",
            str(tmp_path / "p"),
            "--n-jobs",
            "2",
            "--preset",
            "funk",
            "--no-align",
            "--quiet",
            *common,
        ]
    )
    assert _crop.run(args) == 0
    # a folder of files named after the tile key values joined by "_" gives the same crops
    byname = tmp_path / "byname"
    byname.mkdir()
    for tile in range(3):
        (byname / f"A1_{tile}.tif").write_bytes(
            (tmp_path / "tiles" / f"A1_Tile-{tile}.tif").read_bytes()
        )
    folder = _parse(
        [
            "crop",
            "--tiles",
            str(byname),
            "--out",
            str(tmp_path / "f"),
            "--no-align",
            "--quiet",
            *common,
        ]
    )
    assert _crop.run(folder) == 0
    a = ad.read_h5ad(tmp_path / "p" / "cells.h5ad")
    b = ad.read_h5ad(tmp_path / "f" / "cells.h5ad")
    assert not a.uns["extract_crops"]["align"]
    assert a.uns["extract_crops"]["n_tiles"] == 3
    assert (np.diff(a.obs["tile"].to_numpy()) >= 0).all()
    np.testing.assert_array_equal(get_crops(a), get_crops(b))
