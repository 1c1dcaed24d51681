"""Readers for known gene relationships (pair tables, complex lists, GMT) and gene groups."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from itertools import combinations
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

RelationshipFormat = Literal["auto", "pairs", "complexes", "gmt"]
PAIR_COLUMNS = ("entity1", "entity2")


def _sniff(path: Path, n_lines: int = 200) -> RelationshipFormat:
    lines = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                lines.append(line.rstrip("\r\n"))
            if len(lines) >= n_lines:
                break
    if not lines:
        msg = f"Relationship file {str(path)!r} is empty."
        raise ValueError(msg)
    if all("\t" not in line for line in lines):
        return "pairs"
    fields = [line.split("\t") for line in lines]
    if any(len(f) >= 3 for f in fields):
        return "gmt"
    if any(" " in f[1].strip() for f in fields if len(f) == 2):
        return "complexes"
    return "pairs"


def read_gene_sets(
    path: str | os.PathLike, *, format: Literal["auto", "complexes", "gmt"] = "auto"
) -> dict[str, list[str]]:
    """Read named gene sets: a complex list or an Enrichr/GMT library.

    Parameters
    ----------
    path
        A complex list (``name<TAB>space-separated symbols``, one complex per line, like CORUM's
        ``CORUM_clusters.tsv``) or a GMT / Enrichr library (``name<TAB>description<TAB>gene<TAB>...``;
        Enrichr's ``GENE,1.0`` weights are dropped).
    format
        ``"auto"`` detects the format from the first lines.

    Returns
    -------
    Mapping of set name -> list of unique gene symbols (order of first appearance).

    Examples
    --------
    >>> from mcvi_ops.metrics import read_gene_sets
    >>> sets = read_gene_sets("complexes.tsv")  # doctest: +SKIP
    """
    path = Path(path)
    if format == "auto":
        sniffed = _sniff(path)
        format = "complexes" if sniffed == "pairs" else sniffed
    if format not in ("complexes", "gmt"):
        msg = f"`format` must be 'auto', 'complexes' or 'gmt', got {format!r}."
        raise ValueError(msg)
    sets: dict[str, list[str]] = {}
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if format == "complexes":
                if len(fields) != 2:
                    msg = (
                        f"Line {number} of {str(path)!r} has {len(fields)} tab-separated fields; "
                        "a complex list has 2 (`name<TAB>gene gene ...`). For GMT files pass "
                        "format='gmt'."
                    )
                    raise ValueError(msg)
                genes = fields[1].split()
            else:
                if len(fields) < 3:
                    msg = (
                        f"Line {number} of {str(path)!r} has {len(fields)} tab-separated fields; "
                        "a GMT line has at least 3 (`name<TAB>description<TAB>gene...`)."
                    )
                    raise ValueError(msg)
                genes = [g.split(",")[0].strip() for g in fields[2:]]
            genes = list(dict.fromkeys(g for g in genes if g))
            name = fields[0].strip()
            if name in sets:
                name = f"{name} ({number})"
            sets[name] = genes
    return sets


def _pairs_from_sets(sets: Mapping[str, Iterable[str]]) -> pd.DataFrame:
    rows: set[tuple[str, str]] = set()
    for genes in sets.values():
        unique = sorted({str(g) for g in genes})
        rows.update(combinations(unique, 2))
    return _canonical_pairs(pd.DataFrame(sorted(rows), columns=list(PAIR_COLUMNS)))


def _canonical_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """Unordered, unique, non-self pairs with ``entity1 < entity2``."""
    if df.shape[0] == 0:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in PAIR_COLUMNS})
    a = df.iloc[:, 0].astype(str).str.strip().to_numpy()
    b = df.iloc[:, 1].astype(str).str.strip().to_numpy()
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    out = pd.DataFrame({"entity1": lo, "entity2": hi})
    out = out[out["entity1"] != out["entity2"]].drop_duplicates(ignore_index=True)
    return out.sort_values(list(PAIR_COLUMNS), ignore_index=True)


def read_relationships(
    path: str | os.PathLike, *, format: RelationshipFormat = "auto"
) -> pd.DataFrame:
    """Read known gene relationships as a table of unordered gene pairs.

    Parameters
    ----------
    path
        One of

        - a pair table (CSV or TSV with the header ``entity1,entity2``, as in the EFAAR
          benchmark annotations; each pair may be listed in both directions),
        - a complex list (``name<TAB>space-separated symbols``, e.g. ``CORUM_clusters.tsv``),
        - a GMT / Enrichr gene-set library (``name<TAB>description<TAB>gene<TAB>...``).

        Every pair of genes sharing a complex or gene set becomes a relationship.
    format
        ``"auto"`` detects the format from the first lines.

    Returns
    -------
    DataFrame with columns ``entity1``, ``entity2`` (``entity1 < entity2``), one row per unordered
    pair, no self-pairs.

    Examples
    --------
    >>> from mcvi_ops.metrics import read_relationships
    >>> pairs = read_relationships("Reactome.txt")  # doctest: +SKIP
    >>> pairs.columns.tolist()  # doctest: +SKIP
    ['entity1', 'entity2']
    """
    path = Path(path)
    if not path.exists():
        msg = f"Relationship file {str(path)!r} does not exist."
        raise FileNotFoundError(msg)
    if format == "auto":
        format = _sniff(path)
    if format in ("complexes", "gmt"):
        return _pairs_from_sets(read_gene_sets(path, format=format))
    if format != "pairs":
        msg = f"`format` must be 'auto', 'pairs', 'complexes' or 'gmt', got {format!r}."
        raise ValueError(msg)
    df = pd.read_csv(path, sep=None, engine="python", dtype=str)
    if set(PAIR_COLUMNS) <= set(df.columns):
        df = df[list(PAIR_COLUMNS)]
    elif df.shape[1] == 2:
        df = pd.read_csv(path, sep=None, engine="python", dtype=str, header=None)
    else:
        msg = (
            f"Pair table {str(path)!r} needs columns {list(PAIR_COLUMNS)} (or exactly two "
            f"columns without a header); found {list(df.columns)}."
        )
        raise ValueError(msg)
    return _canonical_pairs(df.dropna())


def as_pairs(source) -> pd.DataFrame:
    """Convert one relationship source (path, pair DataFrame, dict of gene sets) to pairs."""
    if isinstance(source, str | os.PathLike):
        return read_relationships(source)
    if isinstance(source, pd.DataFrame):
        if set(PAIR_COLUMNS) <= set(source.columns):
            return _canonical_pairs(source[list(PAIR_COLUMNS)].dropna())
        if source.shape[1] == 2:
            return _canonical_pairs(source.dropna())
        msg = f"A relationship DataFrame needs columns {list(PAIR_COLUMNS)}; got {list(source.columns)}."
        raise ValueError(msg)
    if isinstance(source, Mapping) and all(
        isinstance(v, set | frozenset | list | tuple | np.ndarray | pd.Index)
        for v in source.values()
    ):
        return _pairs_from_sets(source)
    msg = (
        "A relationship source must be a path, a DataFrame with columns entity1/entity2, or a dict "
        f"of gene-set name -> genes; got {type(source).__name__}."
    )
    raise TypeError(msg)


def normalize_sources(relationships) -> dict[str, pd.DataFrame]:
    """Turn the ``relationships`` argument into a dict of source name -> pair table."""
    if isinstance(relationships, str | os.PathLike):
        return {Path(relationships).stem: as_pairs(relationships)}
    if isinstance(relationships, pd.DataFrame):
        return {"relationships": as_pairs(relationships)}
    if isinstance(relationships, Mapping):
        values = list(relationships.values())
        if values and all(
            isinstance(v, str | os.PathLike | pd.DataFrame | Mapping) for v in values
        ):
            return {str(name): as_pairs(src) for name, src in relationships.items()}
        return {"relationships": as_pairs(relationships)}
    if isinstance(relationships, list | tuple):
        out = {}
        for src in relationships:
            if not isinstance(src, str | os.PathLike):
                msg = "A list of relationship sources must hold paths; use a dict name -> source."
                raise TypeError(msg)
            out[Path(src).stem] = as_pairs(src)
        return out
    return {"relationships": as_pairs(relationships)}


def read_gene_groups(path: str | os.PathLike) -> dict[str, str]:
    """Read a gene -> functional group mapping.

    Parameters
    ----------
    path
        A JSON file mapping gene -> group (like ``functional_clusters.json`` of Funk et al. 2022),
        a JSON file mapping group -> list of genes, a CSV/TSV with two columns (gene, group), or a
        complex list / GMT file (a gene in several sets is an error).

    Returns
    -------
    Mapping of gene symbol -> group name.

    Examples
    --------
    >>> from mcvi_ops.metrics import read_gene_groups
    >>> groups = read_gene_groups("functional_clusters.json")  # doctest: +SKIP
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
        if not isinstance(data, dict):
            msg = f"{str(path)!r} must hold a JSON object (gene -> group or group -> genes)."
            raise ValueError(msg)
        if all(isinstance(v, str) for v in data.values()):
            return {str(k): v for k, v in data.items()}
        sets = {str(k): list(v) for k, v in data.items()}
    elif path.suffix.lower() in (".csv", ".tsv") and _sniff(path) == "pairs":
        df = pd.read_csv(path, sep=None, engine="python", dtype=str).dropna()
        if df.shape[1] < 2:
            msg = f"{str(path)!r} needs two columns: gene, group."
            raise ValueError(msg)
        return dict(zip(df.iloc[:, 0], df.iloc[:, 1], strict=True))
    else:
        sets = read_gene_sets(path)
    out: dict[str, str] = {}
    for group, genes in sets.items():
        for gene in genes:
            if gene in out and out[gene] != group:
                msg = (
                    f"Gene {gene!r} is in groups {out[gene]!r} and {group!r}; gene-function "
                    "classification needs one group per gene."
                )
                raise ValueError(msg)
            out[str(gene)] = group
    return out
