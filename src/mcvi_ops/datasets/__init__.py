"""Simulated optical pooled screens with known ground truth."""

from ._synthetic import synthetic_screen

__all__ = ["synthetic_screen"]
