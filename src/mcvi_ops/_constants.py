"""Keys of this package: minibatch fields, ``.uns`` entries and ``.obsm`` embeddings.

scvi-tools' own keys (``"X"`` for the minibatch tensor, ``"batch"``) come from
:data:`scvi.REGISTRY_KEYS` in the modules that already import scvi-tools; this module stays free
of heavy imports so that ``import mcvi_ops`` is fast.
"""

from __future__ import annotations

from types import SimpleNamespace

#: registry and minibatch keys of the fields that :meth:`~mcvi_ops.MCVAE.setup_anndata` registers
IMAGE_KEY = "crops"
PERTURBATION_KEY = "perturbation"
CROP_INDEX_KEY = "crop_index"
INTENSITY_FACTOR_KEY = "intensity_factors"  # optional per-cell, per-channel intensity factors
#: the control category always gets this code in the perturbation field
CONTROL_CODE = 0

#: ``.uns`` entries written by this package
UNS = SimpleNamespace(
    crops="crops",  # reference of an AnnData to its crop store (url, index column, ...)
    extract="extract_crops",  # parameters and counts of :func:`~mcvi_ops.pp.extract_crops`
    import_crops="import_crops",  # provenance of :func:`~mcvi_ops.io.crops_from_array` & co.
    synthetic="synthetic_screen",  # parameters of a simulated screen
    ground_truth="ground_truth",  # simulated effect of each gene
    guide_truth="guide_truth",  # simulated efficiency of each guide
    intensity_factors="intensity_factors",  # per-cell illumination x batch gains (also .obsm)
)

#: default ``.obs`` column holding each row's crop index
DEFAULT_INDEX_KEY = "crop_index"

#: ``.obsm`` keys of the embeddings the models write
OBSM = SimpleNamespace(
    salient="X_mcvae_salient",
    background="X_mcvae_background",
    both="X_mcvae",
    vae="X_vae",
    features_salient="X_fmcvae_salient",
    features_background="X_fmcvae_background",
    features_both="X_fmcvae",
)
