import re
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


def test_gmt_names_with_spaces_and_empty_description(tmp_path):
    # Enrichr libraries: set names with spaces, an empty description, `GENE,weight` entries
    path = tmp_path / "enrichr.gmt"
    path.write_text("ERBB signaling WP673\t\tEGFR,1.0\tERBB2,1.0\nSet two\tdesc\tA\tB\tA\n")
    assert read_gene_sets(path) == {
        "ERBB signaling WP673": ["EGFR", "ERBB2"],
        "Set two": ["A", "B"],
    }


def test_pair_table_forms_unchanged(tmp_path):
    # header with extra columns, tab-separated, and headerless pairs give the same pairs
    expected = pd.DataFrame({"entity1": ["A", "C"], "entity2": ["B", "D"]})
    forms = {
        "extra.csv": "source,entity2,entity1\nx,B,A\ny,C,D\n",
        "tabs.tsv": "entity1\tentity2\nA\tB\nD\tC\nB\tA\n",
        "bare.csv": "A,B\r\nC,D\r\n\r\n",
        "quoted.csv": '"entity1","entity2"\n"A","B"\n"C","D"\n',
        "spaces.txt": "A B\nC D\n",
    }
    for name, text in forms.items():
        path = tmp_path / name
        path.write_text(text)
        pd.testing.assert_frame_equal(read_relationships(path), expected, check_dtype=False)


def test_simulated_screen_complex_files(tmp_path):
    # the complex membership a simulated screen writes, as a complex list or as GMT
    members = {"CPLX01": ["G001", "G002", "G003"], "CPLX02": ["G004", "G005", "G006", "G007"]}
    tsv, gmt = tmp_path / "complexes.tsv", tmp_path / "complexes.gmt"
    tsv.write_text("".join(f"{k}\t{' '.join(v)}\n" for k, v in members.items()))
    gmt.write_text(
        "".join(f"{k}\tsimulated complex\t{chr(9).join(v)}\n" for k, v in members.items())
    )
    assert read_gene_sets(tsv) == members
    assert read_gene_sets(gmt) == members
    pd.testing.assert_frame_equal(read_relationships(tsv), read_relationships(gmt))
    assert len(read_relationships(tsv)) == 3 + 6


@pytest.mark.parametrize(
    ("content", "line", "problem"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 3, "binary file"),
        (b"entity1,entity2\nA,B\n\xff\xfe,C\n", 3, "not UTF-8 text"),
        (b"entity1,entity2\nA,B\nC,D,E\nF,G\n", 3, "has 3 fields separated by commas"),
        (b"entity1,entity2\nA,B\nC\n", 3, "has 1 field separated by commas"),
        (b"CPLX1\tA;B;C\nCPLX2\tD;E\n", 1, "separated by semicolons"),
        (b"CPLX1\tA B C\nCPLX2\tD E\nCPLX3\tF G\tH\n", 3, "has 3 tab-separated fields"),
        (b"SET1\td\tA\tB\nSET2\td\tC;D\tE\n", 2, "separated by semicolons"),
        (b"CPLX1;A;B;C\n", 1, "separated by semicolons"),
        (b"CPLX1\tA,B,C\n", 1, "separated by commas"),
    ],
)
def test_malformed_files_name_file_line_and_formats(tmp_path, content, line, problem):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(
        ValueError, match=rf"'{re.escape(str(path))}', line {line}: .*{problem}"
    ) as err:
        read_relationships(path)
    assert "Accepted formats: a pair table" in str(err.value)
    assert "GMT" in str(err.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.tsv"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="is empty"):
        read_relationships(path)
