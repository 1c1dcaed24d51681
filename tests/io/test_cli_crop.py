from __future__ import annotations

import argparse
import sys

import anndata as ad
import numpy as np
import pytest
import tifffile

import mcvi_ops.pp
from mcvi_ops.cli import _crop, main
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


def test_cli_crop_on_error_and_nonfinite(tiles, eh, tmp_path, capsys):
    template, table, _ = tiles
    table.to_csv(tmp_path / "cells.csv", index=False)
    tile = tmp_path / "tiles" / "A1_Tile-1.tif"
    tile.write_bytes(tile.read_bytes()[: tile.stat().st_size // 2])  # a truncated copy
    common = ["--cells", str(tmp_path / "cells.csv"), "--channel-names", "DNA,PH3,cellbody"]
    common += ["--tiles", template, "--no-align", "--quiet"]
    assert main(["crop", "--out", str(tmp_path / "raise"), *common]) == 2
    assert "A1_Tile-1.tif" in capsys.readouterr().err
    assert main(["crop", "--out", str(tmp_path / "skip"), "--on-error", "skip", *common]) == 0
    assert f"{(table.tile == 1).sum()} in unreadable tiles" in capsys.readouterr().out
    skipped = ad.read_h5ad(tmp_path / "skip" / "cells.h5ad")
    assert set(skipped.obs["tile"]) == {0, 2}

    image, cells = eh
    floats = image.astype(np.float32)
    floats[1, 260, 240] = np.nan  # inside the crops of the cells nearby
    tifffile.imwrite(tmp_path / "float.tif", floats, photometric="minisblack")
    cells.to_csv(tmp_path / "eh.csv", index=False)
    common = ["--tiles", str(tmp_path / "float.tif"), "--cells", str(tmp_path / "eh.csv")]
    common += ["--channel-names", "DNA,PH3,cellbody", "--dtype", "float32", "--quiet"]
    assert main(["crop", "--out", str(tmp_path / "nan"), "--no-align", *common]) == 2
    assert "NaN or infinite" in capsys.readouterr().err
    args = ["crop", "--out", str(tmp_path / "zero"), "--no-align", "--nonfinite", "zero"]
    assert main([*args, *common]) == 0
    info = ad.read_h5ad(tmp_path / "zero" / "cells.h5ad").uns["extract_crops"]
    assert info["nonfinite"] == "zero"
    assert info["n_nonfinite_values"] == info["n_nonfinite_cells"] > 0  # one pixel per crop
    assert f"in {info['n_nonfinite_cells']} crops" in capsys.readouterr().out


def test_cli_crop_scheduler_connects_and_disconnects(paths, tmp_path, monkeypatch, capsys):
    class Client:
        def __init__(self, address):
            self.address, self.closed = address, False
            clients.append(self)

        def close(self):
            self.closed = True

    clients, seen = [], []
    real = mcvi_ops.pp.extract_crops

    def extract_crops(*args, client, **kwargs):
        seen.append(client)
        return real(*args, **kwargs)  # crop locally: the fake client has no workers

    monkeypatch.setitem(sys.modules, "distributed", type(sys)("distributed"))
    monkeypatch.setattr(sys.modules["distributed"], "Client", Client, raising=False)
    monkeypatch.setattr(mcvi_ops.pp, "extract_crops", extract_crops)
    argv = ["crop", "--tiles", str(paths["image"]), "--cells", str(paths["cells"])]
    argv += ["--channel-names", "DNA,PH3,cellbody", "--no-align", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--scheduler", "tcp://10.0.0.5:8786"]) == 0
    assert [c.address for c in clients] == ["tcp://10.0.0.5:8786"]
    assert seen == clients and clients[0].closed
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert seen[-1] is None

    monkeypatch.setitem(sys.modules, "distributed", None)  # not installed
    assert main([*argv, "--out", str(tmp_path / "c"), "--scheduler", "tcp://x:8786"]) == 2
    err = capsys.readouterr().err
    assert "needs dask.distributed" in err and "pip install mcvi-ops[distributed]" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow  # starts a one-worker cluster in this process
def test_cli_crop_on_a_dask_cluster(tiles, tmp_path):
    distributed = pytest.importorskip("distributed")
    template, table, _ = tiles
    table.to_csv(tmp_path / "cells.csv", index=False)
    argv = ["crop", "--tiles", template, "--cells", str(tmp_path / "cells.csv"), "--quiet"]
    argv += ["--channel-names", "DNA,PH3,cellbody", "--no-align"]
    assert main([*argv, "--out", str(tmp_path / "local")]) == 0
    with distributed.LocalCluster(
        n_workers=1, processes=False, threads_per_worker=1, dashboard_address=None
    ) as cluster:
        address = cluster.scheduler_address
        assert main([*argv, "--out", str(tmp_path / "dask"), "--scheduler", address]) == 0
    local = ad.read_h5ad(tmp_path / "local" / "cells.h5ad")
    on_dask = ad.read_h5ad(tmp_path / "dask" / "cells.h5ad")
    assert list(on_dask.obs_names) == list(local.obs_names)
    np.testing.assert_array_equal(get_crops(on_dask), get_crops(local))
