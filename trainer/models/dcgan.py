"""DCGAN generator and discriminator (Radford et al., 2016) for square images of any power-of-two size.

The generator projects z to a 4x4 map and doubles the resolution with transposed convolutions until it
reaches `image_size`; the discriminator mirrors it with strided convolutions. Widths halve (generator)
or double (discriminator) at every resolution step, as in the paper. The discriminator's hidden layers are
normalised by BatchNorm, as in the paper, or by spectral normalisation of every convolution (Miyato et al.,
2018), which bounds how fast its output can change with its input and keeps it from racing ahead of the
generator, at the cost of one power iteration per convolution and step.
"""

import itertools
import math
from typing import Annotated, Literal

import torch
from torch import nn

from trainer.config.ranges import Interval, Positive, PowerOfTwo

# The generator starts from 4x4 and doubles it per layer: 8, 16, 32, ...
ImageSize = Annotated[int, Interval(low=8), PowerOfTwo()]
Norm = Literal["batch", "spectral"]


def _num_upsamplings(image_size: int) -> int:
    steps = math.log2(image_size) - 2
    if image_size < 8 or not steps.is_integer():
        raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
    return int(steps)


def init_dcgan_weights(module: nn.Module) -> None:
    """N(0, 0.02) for convolutions, N(1, 0.02) for BatchNorm scales, as in the DCGAN paper."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    def __init__(
        self,
        latent_dim: Positive = 100,
        image_size: ImageSize = 64,
        channels: Positive = 3,
        width: Positive = 64,
    ):
        super().__init__()
        self.latent_dim = latent_dim
        steps = _num_upsamplings(image_size)
        widths = [width * 2**i for i in reversed(range(steps))]  # e.g. [256, 128, 64] for 32x32
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, widths[0], 4, 1, 0, bias=False),  # 1x1 -> 4x4
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        for w_in, w_out in itertools.pairwise(widths):
            layers += [
                nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False),
                nn.BatchNorm2d(w_out),
                nn.ReLU(True),
            ]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(init_dcgan_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], self.latent_dim, 1, 1))


class Discriminator(nn.Module):
    """Outputs one logit per image; the sigmoid lives in the loss (BCE with logits) for stability."""

    def __init__(
        self,
        image_size: ImageSize = 64,
        channels: Positive = 3,
        width: Positive = 64,
        norm: Norm = "batch",
    ):
        super().__init__()
        steps = _num_upsamplings(image_size)
        widths = [width * 2**i for i in range(steps)]  # e.g. [64, 128, 256] for 32x32
        layers: list[nn.Module] = [
            nn.Conv2d(channels, widths[0], 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, True),
        ]
        for w_in, w_out in itertools.pairwise(widths):
            batch_norm = [nn.BatchNorm2d(w_out)] if norm == "batch" else []
            layers += [nn.Conv2d(w_in, w_out, 4, 2, 1, bias=False), *batch_norm, nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False)]  # 4x4 -> 1x1
        self.net = nn.Sequential(*layers)
        self.apply(init_dcgan_weights)
        if norm == "spectral":
            for conv in self.net:
                if isinstance(conv, nn.Conv2d):
                    nn.utils.parametrizations.spectral_norm(conv)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).flatten()
