"""Multi-Contrastive VAE for optical pooled screens, built on scvi-tools."""

from importlib.metadata import PackageNotFoundError, version

from . import data

try:
    __version__ = version("mcvi-ops")
except PackageNotFoundError:  # pragma: no cover - source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__", "data"]
