from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

from mcvi_ops.tl._utils import gene_rows


def test_gene_rows_from_obs_names_or_column_drops_controls_and_flagged_rows():
    obs = pd.DataFrame(
        {
            "gene": pd.Categorical(["A", "nontargeting", "B", "C"]),
            "number": [1, 2, 3, 4],
            "is_control": [False, False, False, True],
        },
        index=["g1", "nontargeting", "g3", "g4"],
    )
    adata = AnnData(obs=obs)

    genes, keep = gene_rows(adata, None, "nontargeting")
    assert genes.tolist() == ["g1", "nontargeting", "g3", "g4"]
    assert keep.tolist() == [True, False, True, False]  # by name, and by obs["is_control"]

    genes, keep = gene_rows(adata, "gene", "nontargeting")
    assert genes.dtype.kind == "U"
    assert genes.tolist() == ["A", "nontargeting", "B", "C"]
    assert keep.tolist() == [True, False, True, False]

    genes, keep = gene_rows(adata, "number", 2)  # non-string genes compare as strings
    assert genes.tolist() == ["1", "2", "3", "4"]
    assert keep.tolist() == [True, False, True, False]

    del adata.obs["is_control"]
    assert gene_rows(adata, "gene", "nontargeting")[1].tolist() == [True, False, True, True]
    with pytest.raises(KeyError, match=r"gene column .obs\['sgRNA'\]"):
        gene_rows(adata, "sgRNA", "nontargeting")
    assert np.array_equal(gene_rows(adata, None, "none")[1], np.ones(4, dtype=bool))
