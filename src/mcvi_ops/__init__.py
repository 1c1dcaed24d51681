"""Multi-Contrastive VAE for optical pooled screens, built on scvi-tools."""

from importlib.metadata import PackageNotFoundError, version

from . import data, io, metrics, model, module, nn, pl, tl
from .model import MCVAE, VAE

try:
    __version__ = version("mcvi-ops")
except PackageNotFoundError:  # pragma: no cover - source tree without installation
    __version__ = "0.0.0"

__all__ = [
    "MCVAE",
    "VAE",
    "__version__",
    "data",
    "io",
    "metrics",
    "model",
    "module",
    "nn",
    "pl",
    "tl",
]
