"""Evaluation metrics: known relationships, mAP activity and consistency, technical covariates, gene function."""

from mcvi_ops._lazy import lazy_getattr

from ._covariates import technical_covariates
from ._function import function_classification, recall_difference
from ._map import phenotypic_activity, phenotypic_consistency
from ._readers import read_gene_groups, read_gene_sets, read_relationships
from ._relationships import known_relationships
from ._synthetic import score_synthetic_screen

__all__ = [
    "function_classification",
    "known_relationships",
    "phenotypic_activity",
    "phenotypic_consistency",
    "read_gene_groups",
    "read_gene_sets",
    "read_relationships",
    "recall_difference",
    "score_synthetic_screen",
    "technical_covariates",
]

__getattr__ = lazy_getattr(
    __name__, {}, moved={"derive_covariates": "mcvi_ops.pp.derive_covariates"}
)
