from __future__ import annotations

import pytest
import torch

from mcvi_ops.nn import ConvDecoder, ConvEncoder


@pytest.mark.parametrize("size", [32, 64, 100, (48, 40), 37])
def test_encoder_decoder_reach_any_crop_size(size):
    encoder = ConvEncoder(3, 8, crop_size=size)
    decoder = ConvDecoder(8, 3, crop_size=size)
    height, width = (size, size) if isinstance(size, int) else size
    x = torch.randn(2, 3, height, width)
    q = encoder(x)
    assert q.loc.shape == (2, 8)
    assert (q.scale > 0).all()
    y = decoder(q.rsample())
    assert y.shape == (2, 3, height, width)
    assert y.abs().max() <= 1.0


def test_five_conv_layers_by_default():
    encoder = ConvEncoder(4, 16)
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5
    decoder = ConvDecoder(16, 4)
    transposed = [m for m in decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(transposed) == 5
    assert isinstance(list(decoder.modules())[-1], torch.nn.Tanh)
