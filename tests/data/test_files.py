"""Safe files: paths built from data stay in their folder; writes replace atomically."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import hypothesis.strategies as st
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings

from mcvi_ops.data._files import atomic_path, check_path_value, contained_path, write_text
from mcvi_ops.data._link import write_h5ad

PARTS = st.lists(
    st.sampled_from(["..", ".", "a", "b", "c d", "", "/", "x..y", "..."]), min_size=1, max_size=6
)


@given(parts=PARTS)
@settings(max_examples=300, deadline=None)
def test_contained_path_never_leaves_its_root(tmp_path_factory, parts):
    root = Path("/srv/screens/tiles")
    relative = "/".join(parts)
    target = os.path.normpath(os.path.join(root, relative))
    inside = os.path.commonpath([str(root), target]) == str(root)
    if inside:
        assert contained_path(root, relative, what="x", fix="y") == Path(target)
    else:
        with pytest.raises(ValueError, match="outside its folder"):
            contained_path(root, relative, what="x", fix="y")


@given(value=st.text(min_size=0, max_size=12))
@settings(max_examples=300, deadline=None)
def test_path_values_from_data_hold_no_path(value):
    unsafe = value in ("", ".", "..") or any(c in value for c in ("/", "\\", "\0"))
    if unsafe:
        with pytest.raises(ValueError, match="cannot be part of a file name"):
            check_path_value(value, what="The well", fix="Fix it.")
    else:
        assert check_path_value(value, what="The well", fix="Fix it.") == value
        # as a single path component it stays directly inside any folder
        assert Path("/data", value).parent == Path("/data")


class _Crash(Exception):
    pass


@given(
    contents=st.lists(st.binary(min_size=0, max_size=64), min_size=1, max_size=6),
    crash_after=st.lists(st.integers(min_value=-1, max_value=64), min_size=6, max_size=6),
)
@settings(max_examples=100, deadline=None)
def test_atomic_replace_leaves_the_old_or_the_new_file_never_a_part(
    tmp_path_factory, contents, crash_after
):
    folder = tmp_path_factory.mktemp("atomic")
    target = folder / "report.md"
    current = None
    for content, crash in zip(contents, crash_after, strict=False):
        try:
            with atomic_path(target) as tmp:
                with open(tmp, "wb") as handle:
                    if 0 <= crash < len(content):  # dies part way through the write
                        handle.write(content[:crash])
                        raise _Crash
                    handle.write(content)
            current = content
        except _Crash:
            pass
        assert (target.read_bytes() if target.exists() else None) == current
        assert [p.name for p in folder.iterdir()] == ([target.name] if current is not None else [])


def test_writes_replace_a_symlink_instead_of_following_it(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "report.md").symlink_to(outside / "precious.txt")
    write_text(folder / "report.md", "# new")
    assert (outside / "precious.txt").read_text() == "keep me"
    assert not (folder / "report.md").is_symlink()
    (folder / "cells.h5ad").symlink_to(outside / "precious.txt")
    adata = ad.AnnData(obs=pd.DataFrame(index=["a", "b"]))
    write_h5ad(adata, folder / "cells.h5ad")
    assert (outside / "precious.txt").read_text() == "keep me"
    assert ad.read_h5ad(folder / "cells.h5ad").n_obs == 2


def test_a_failed_h5ad_write_keeps_the_earlier_file(tmp_path):
    path = tmp_path / "cells.h5ad"
    write_h5ad(ad.AnnData(obs=pd.DataFrame(index=["a", "b"])), path)
    bad = ad.AnnData(obs=pd.DataFrame(index=["a"]))
    bad.uns["unwritable"] = object()  # anndata cannot write it: the write fails part way
    with pytest.raises(Exception, match="object"):
        write_h5ad(bad, path)
    assert ad.read_h5ad(path).n_obs == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad"]


def test_folders_replace_as_a_whole(tmp_path):
    target = tmp_path / "model"
    with atomic_path(target, folder=True) as tmp:
        (tmp / "a.pt").write_bytes(b"1")
    with pytest.raises(_Crash), atomic_path(target, folder=True) as tmp:
        (tmp / "b.pt").write_bytes(b"2")
        raise _Crash
    assert sorted(p.name for p in target.iterdir()) == ["a.pt"]
    with atomic_path(target, folder=True) as tmp:
        (tmp / "c.pt").write_bytes(np.zeros(3).tobytes())
    assert sorted(p.name for p in target.iterdir()) == ["c.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
