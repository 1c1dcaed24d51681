"""The simulated complexes as gene sets: in ``.uns`` and as a GMT file next to the crop store.

A simulated screen then ships its own known relationships, so
:func:`~mcvi_ops.metrics.known_relationships` can score it without CORUM (whose genes the
simulation does not share anyway).
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

import pandas as pd

#: the GMT file is named after the crop store: ``screen.zarr`` -> ``screen_complexes.gmt``
COMPLEXES_SUFFIX = "_complexes.gmt"


def complexes_of(genes: pd.DataFrame) -> dict[str, list[str]]:
    """Complex name -> member genes (sorted), from the per-gene ground truth table."""
    with_complex = genes[genes["complex"] != "none"]
    return {
        str(name): sorted(str(g) for g in members.index)
        for name, members in with_complex.groupby("complex", sort=True)
    }


def _is_url(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def complexes_path(store: str | os.PathLike) -> str | Path:
    """Where the GMT file of a store at ``store`` goes: beside it, named after it."""
    text = os.fspath(store).rstrip("/")
    if _is_url(text):
        head, name = posixpath.split(text)
        return posixpath.join(head, _stem(name) + COMPLEXES_SUFFIX)
    path = Path(text.removeprefix("file://")).expanduser()
    return path.with_name(_stem(path.name) + COMPLEXES_SUFFIX)


def _stem(name: str) -> str:
    return name.removesuffix(".zarr") or name


def gmt_text(complexes: dict[str, list[str]], genes: pd.DataFrame) -> str:
    """GMT lines ``name<TAB>description<TAB>gene<TAB>...``; the description names the effect."""
    lines = []
    for name, members in complexes.items():
        first = genes.loc[members[0]]
        description = f"simulated {first['effect']} ({first['effect_kind']})"
        lines.append("\t".join([name, description, *members]))
    return "".join(f"{line}\n" for line in lines)


def write_complexes(target: str | Path, text: str) -> None:
    """Write the GMT text to a local path or an fsspec URL."""
    if isinstance(target, Path):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        return
    import fsspec

    with fsspec.open(target, "w", encoding="utf-8") as fh:
        fh.write(text)
