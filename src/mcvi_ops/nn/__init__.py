"""Neural-network building blocks: encoders and decoders for image crops and feature tables."""

from ._conv import ConvDecoder, ConvEncoder
from ._mlp import MLPDecoder, MLPEncoder

__all__ = ["ConvDecoder", "ConvEncoder", "MLPDecoder", "MLPEncoder"]
