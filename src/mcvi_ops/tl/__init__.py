"""Analysis tools: CellProfiler features, control normalisation, aggregation, novelty, UMAPs."""

from ._aggregate import aggregate
from ._cellprofiler import cellprofiler_features
from ._features import feature_embedding, to_mudata
from ._normalize import normalize_to_controls
from ._novelty import phenotype_novelty
from ._umap import umaps

__all__ = [
    "aggregate",
    "cellprofiler_features",
    "feature_embedding",
    "normalize_to_controls",
    "phenotype_novelty",
    "to_mudata",
    "umaps",
]
