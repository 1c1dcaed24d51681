"""Readers for known gene relationships (pair tables, complex lists, GMT) and gene groups."""

from __future__ import annotations

import csv
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
FORMATS_ACCEPTED = (
    "Accepted formats: a pair table (CSV or TSV with the header `entity1,entity2`, or exactly "
    "two columns without a header, one pair per line); a complex list (`name<TAB>GENE1 GENE2 "
    "...`, genes separated by spaces, one complex per line, like CORUM_clusters.tsv); a GMT / "
    "Enrichr library (`name<TAB>description<TAB>GENE1<TAB>GENE2...`)."
)


def _malformed(path: Path, number: int, problem: str) -> ValueError:
    msg = f"Relationship file {str(path)!r}, line {number}: {problem}. {FORMATS_ACCEPTED}"
    return ValueError(msg)


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """Non-empty lines of a text file with their 1-based line numbers (binary files refused)."""
    raw = path.read_bytes()
    nul = raw.find(b"\x00")
    if nul >= 0:
        number = raw.count(b"\n", 0, nul) + 1
        raise _malformed(path, number, "holds a NUL byte: this is a binary file, not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        number = raw.count(b"\n", 0, err.start) + 1
        problem = (
            f"is not UTF-8 text (byte {raw[err.start]:#04x}); is it a binary or compressed file? "
            "Decompress it or save it as UTF-8 text"
        )
        raise _malformed(path, number, problem) from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [(n, line) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not lines:
        msg = f"Relationship file {str(path)!r} is empty."
        raise ValueError(msg)
    return lines


def _is_pair_header(line: str) -> bool:
    fields = {f.strip().strip('"') for f in line.replace("\t", ",").split(",")}
    return set(PAIR_COLUMNS) <= fields


def _sniff(lines: list[tuple[int, str]], n_lines: int = 200) -> RelationshipFormat:
    sample = [line for _, line in lines[:n_lines]]
    if _is_pair_header(sample[0]) or all("\t" not in line for line in sample):
        return "pairs"
    fields = [line.split("\t") for line in sample]
    n_long = sum(len(f) >= 3 for f in fields)
    n_two = sum(len(f) == 2 for f in fields)
    # the majority decides, so that the error points at the odd line of a ragged file
    if n_long > n_two:
        return "gmt"
    if any(" " in f[1].strip() for f in fields if len(f) == 2):
        return "complexes"
    return "pairs"


def _check_gene(path: Path, number: int, gene: str, *, separator: str) -> None:
    for bad, name in ((";", "semicolons"), (",", "commas")):
        if bad in gene and bad != separator:
            problem = (
                f"{gene[:60]!r} holds several genes separated by {name}; separate the genes of "
                "a complex with spaces (complex list) or tabs (GMT)"
            )
            raise _malformed(path, number, problem)


def _parse_gene_sets(
    path: Path, lines: list[tuple[int, str]], format: Literal["complexes", "gmt"]
) -> dict[str, list[str]]:
    sets: dict[str, list[str]] = {}
    for number, line in lines:
        fields = line.split("\t")
        if format == "complexes":
            if len(fields) != 2:
                problem = (
                    f"has {len(fields)} tab-separated fields, but this file reads as a complex "
                    "list, which has 2 (`name<TAB>GENE1 GENE2 ...`); for a GMT file pass "
                    "format='gmt'"
                )
                raise _malformed(path, number, problem)
            genes = fields[1].split()
            for gene in genes:
                _check_gene(path, number, gene, separator=" ")
        else:
            if len(fields) < 3:
                problem = (
                    f"has {len(fields)} tab-separated fields, but this file reads as a GMT "
                    "library, whose lines have at least 3 (`name<TAB>description<TAB>GENE...`)"
                )
                raise _malformed(path, number, problem)
            # Not decoupler.pp.read_gmt: it splits on any whitespace, so set names with spaces
            # and the empty description field of Enrichr libraries (`name<TAB><TAB>GENE`) shift
            # the columns, and it keeps Enrichr's `GENE,1.0` weights in the gene names.
            genes = []
            for field in fields[2:]:
                gene = field.split(",")[0].strip()
                _check_gene(path, number, gene, separator=",")
                genes.append(gene)
        genes = list(dict.fromkeys(g for g in genes if g))
        name = fields[0].strip()
        if name in sets:
            name = f"{name} ({number})"
        sets[name] = genes
    return sets


def _parse_pairs(path: Path, lines: list[tuple[int, str]]) -> pd.DataFrame:
    first_number, first = lines[0]
    if "\t" in first:
        sep, sep_name = "\t", "tabs"
    elif "," in first:
        sep, sep_name = ",", "commas"
    elif len(first.split()) == 2:
        sep, sep_name = None, "spaces"
    elif ";" in first:
        problem = (
            f"{first[:60]!r} is separated by semicolons; separate the two genes of a pair with "
            "a comma or a tab, and the genes of a complex with spaces"
        )
        raise _malformed(path, first_number, problem)
    else:
        problem = (
            f"{first[:60]!r} does not split into two columns at a comma, a tab or a space; "
            "a pair table has two gene columns"
        )
        raise _malformed(path, first_number, problem)
    texts = [line for _, line in lines]
    split = (t.split() for t in texts) if sep is None else csv.reader(texts, delimiter=sep)
    rows = list(split)
    n_fields = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    n_columns = int(n_fields[0])
    odd = np.flatnonzero(n_fields != n_columns)
    if odd.size:
        number, n = lines[odd[0]][0], int(n_fields[odd[0]])
        problem = (
            f"has {n} field{'s' * (n != 1)} separated by {sep_name}, but line {first_number} "
            f"has {n_columns}; every line of a pair table has the same columns"
        )
        raise _malformed(path, number, problem)
    header = [f.strip() for f in rows[0]]
    if set(PAIR_COLUMNS) <= set(header):
        columns = [header.index(c) for c in PAIR_COLUMNS]
        first_row = 1
    elif n_columns == 2:
        columns, first_row = [0, 1], 0
    else:
        msg = (
            f"Pair table {str(path)!r} needs columns {list(PAIR_COLUMNS)} (or exactly two "
            f"columns without a header); found {header}. {FORMATS_ACCEPTED}"
        )
        raise ValueError(msg)
    df = pd.DataFrame(
        [(r[columns[0]].strip(), r[columns[1]].strip()) for r in rows[first_row:]],
        columns=list(PAIR_COLUMNS),
    )
    separators = "[;,]" if sep != "," else ";"
    several = (
        df["entity1"].str.contains(separators) | df["entity2"].str.contains(separators)
    ).to_numpy()
    if several.any():
        k = int(np.flatnonzero(several)[0])
        pair = df.iloc[k].tolist()
        gene = next(g for g in pair if ";" in g or (sep != "," and "," in g))
        _check_gene(path, lines[first_row + k][0], gene, separator=sep or " ")
    return df[(df["entity1"] != "") & (df["entity2"] != "")]


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

    Raises
    ------
    ValueError
        For a binary file, a line with the wrong number of fields, or genes separated by ``;``
        or ``,``: the message names the file, the line and the accepted formats.

    Examples
    --------
    >>> from mcvi_ops.metrics import read_gene_sets
    >>> sets = read_gene_sets("complexes.tsv")  # doctest: +SKIP
    """
    path = Path(path)
    if format not in ("auto", "complexes", "gmt"):
        msg = f"`format` must be 'auto', 'complexes' or 'gmt', got {format!r}."
        raise ValueError(msg)
    lines = _read_lines(path)
    if format == "auto":
        sniffed = _sniff(lines)
        format = "complexes" if sniffed == "pairs" else sniffed
    return _parse_gene_sets(path, lines, format)


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

    Raises
    ------
    ValueError
        For a malformed file (binary, ragged lines, genes separated by ``;``): the message names
        the file, the line and the accepted formats.

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
    if format not in ("auto", "pairs", "complexes", "gmt"):
        msg = f"`format` must be 'auto', 'pairs', 'complexes' or 'gmt', got {format!r}."
        raise ValueError(msg)
    lines = _read_lines(path)
    if format == "auto":
        format = _sniff(lines)
    if format in ("complexes", "gmt"):
        return _pairs_from_sets(_parse_gene_sets(path, lines, format))
    return _canonical_pairs(_parse_pairs(path, lines))


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
    elif path.suffix.lower() in (".csv", ".tsv") and _sniff(_read_lines(path)) == "pairs":
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
