"""Multi-Contrastive VAE for optical pooled screens, built on scvi-tools.

Importing the package is light: torch, lightning and scvi-tools load when a model, loader, field
or training plan is first used.
"""

from importlib.metadata import PackageNotFoundError, version

from ._lazy import lazy_getattr

try:
    __version__ = version("mcvi-ops")
except PackageNotFoundError:  # pragma: no cover - source tree without installation
    __version__ = "0.0.0"

_SUBPACKAGES = (
    "data",
    "dataloaders",
    "datasets",
    "io",
    "metrics",
    "model",
    "module",
    "nn",
    "pl",
    "pp",
    "tl",
    "train",
)

__all__ = ["MCVAE", "VAE", "FeatureMCVAE", "__version__", "settings", *_SUBPACKAGES]

__getattr__ = lazy_getattr(
    __name__,
    {
        "MCVAE": ".model",
        "VAE": ".model",
        "FeatureMCVAE": ".model",
        "settings": "._logging",
        **{name: f".{name}" for name in _SUBPACKAGES},
    },
)


def __dir__() -> list[str]:
    return sorted(__all__)
