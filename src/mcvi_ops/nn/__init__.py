"""Neural-network building blocks: convolutional encoders and decoders for image crops."""

from ._conv import ConvDecoder, ConvEncoder

__all__ = ["ConvDecoder", "ConvEncoder"]
