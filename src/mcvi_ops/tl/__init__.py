"""Analysis tools: aggregation to guides and genes, phenotype novelty and the feature baseline."""

from ._aggregate import aggregate
from ._features import feature_embedding, to_mudata
from ._novelty import phenotype_novelty

__all__ = ["aggregate", "feature_embedding", "phenotype_novelty", "to_mudata"]
