from pathlib import Path

import pandas as pd
import pytest

from mcvi_ops.metrics import read_gene_groups, read_gene_sets, read_relationships
from mcvi_ops.metrics._readers import normalize_sources

DATA = Path(__file__).parents[1] / "data" / "relationships"


def test_pair_table_both_directions_collapsed():
    raw = pd.read_csv(DATA / "Reactome_subset.txt")
    pairs = read_relationships(DATA / "Reactome_subset.txt")
    assert list(pairs.columns) == ["entity1", "entity2"]
    assert (pairs["entity1"] < pairs["entity2"]).all()
    expected = {tuple(sorted(p)) for p in raw.itertuples(index=False) if p[0] != p[1]}
    assert set(pairs.itertuples(index=False, name=None)) == expected
    assert not pairs.duplicated().any()


def test_humap_subset_reads():
    pairs = read_relationships(DATA / "HuMAP_subset.txt")
    assert pairs.shape[0] > 50
    assert ("ATF2", "JUN") in set(pairs.itertuples(index=False, name=None))


def test_complex_list():
    sets = read_gene_sets(DATA / "toy_complexes.tsv")
    assert sets["Toy complex A"] == ["GENE1", "GENE2", "GENE3"]
    assert sets["Toy complex C (duplicate members)"] == ["GENE5", "GENE6"]
    pairs = read_relationships(DATA / "toy_complexes.tsv")
    assert set(pairs.itertuples(index=False, name=None)) == {
        ("GENE1", "GENE2"),
        ("GENE1", "GENE3"),
        ("GENE2", "GENE3"),
        ("GENE3", "GENE4"),
        ("GENE5", "GENE6"),
    }


def test_gmt():
    sets = read_gene_sets(DATA / "toy_gene_sets.gmt")
    assert sets == {"TOY_SET_1": ["GENE1", "GENE2", "GENE3"], "TOY_SET_2": ["GENE4", "GENE5"]}
    pairs = read_relationships(DATA / "toy_gene_sets.gmt")
    assert len(pairs) == 4


def test_gene_groups_json():
    groups = read_gene_groups(DATA / "functional_clusters_subset.json")
    assert len(groups) == 60
    assert len(set(groups.values())) == 4


def test_gene_groups_from_sets_and_conflict(tmp_path):
    groups = read_gene_groups(DATA / "toy_gene_sets.gmt")
    assert groups["GENE4"] == "TOY_SET_2"
    with pytest.raises(ValueError, match="is in groups"):
        read_gene_groups(DATA / "toy_complexes.tsv")  # GENE3 is in two complexes


def test_sources_in_many_forms():
    df = pd.DataFrame({"entity1": ["B", "A"], "entity2": ["A", "B"]})
    out = normalize_sources(
        {"paths": DATA / "toy_complexes.tsv", "frame": df, "sets": {"s": {"X", "Y", "Z"}}}
    )
    assert list(out) == ["paths", "frame", "sets"]
    assert len(out["frame"]) == 1
    assert len(out["sets"]) == 3
    assert list(normalize_sources({"s1": ["A", "B"], "s2": ["B", "C"]})) == ["relationships"]
    assert list(normalize_sources(DATA / "HuMAP_subset.txt")) == ["HuMAP_subset"]


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_relationships(tmp_path / "missing.txt")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="entity1"):
        read_relationships(bad)
