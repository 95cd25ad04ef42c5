"""SRResNet, the generator of Ledig et al. (2017), figure 4."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class NarrowOutputConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state dict, same function) for few output channels.

    On CPU it runs as the equivalent transposed convolution with the flipped kernel: for
    SRResNet's 9x9 64->3 tail, oneDNN's backward of conv2d is 2.5-4x slower than that of
    conv_transpose2d (whose input gradient is an ordinary 3->64 convolution). Measured on one
    Zen 4 core, batch 4 at 96x96: tail forward+backward ~110 ms instead of ~180 ms, about a
    quarter of a pretrain step. CUDA and any non-default geometry use nn.Conv2d unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = (x.device.type != "cpu" or self.stride != (1, 1) or self.dilation != (1, 1)
                 or self.groups != 1 or self.padding_mode != "zeros"
                 or isinstance(self.padding, str))
        if plain:
            return super().forward(x)
        weight = self.weight.flip(2, 3).transpose(0, 1)
        return F.conv_transpose2d(x, weight, self.bias, padding=self.padding)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.PReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class UpsampleBlock(nn.Module):
    """Sub-pixel convolution (Shi et al. 2016): conv to 4C channels, PixelShuffle(2), PReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels * 4, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.act = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.shuffle(self.conv(x)))


class SRResNet(nn.Module):
    """LR in [0, 1] (N,3,h,w) -> SR in [-1, 1] (N,3,rh,rw), the paper's value ranges.

    `global_skip` (beyond the paper, as BasicSR's MSRResNet) adds a bicubic upsampling of the
    input to the output so the network only learns the residual; it makes short CPU runs beat
    bicubic instead of starting from a random image.
    """

    def __init__(
        self, blocks: int = 16, channels: int = 64, scale: int = 4, global_skip: bool = False
    ) -> None:
        super().__init__()
        if scale not in (2, 4, 8):
            raise ValueError(f"SRResNet upsamples by powers of two (2, 4, 8), got scale={scale}")
        self.scale = scale
        self.global_skip = global_skip
        self.head = nn.Sequential(nn.Conv2d(3, channels, 9, padding=4), nn.PReLU())
        self.body = nn.Sequential(*[ResidualBlock(channels) for _ in range(blocks)])
        self.body_tail = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        )
        self.upsample = nn.Sequential(
            *[UpsampleBlock(channels) for _ in range(scale.bit_length() - 1)]
        )
        self.tail = NarrowOutputConv2d(channels, 3, 9, padding=4)
        if global_skip:
            # Start close to the bicubic skip, so early updates refine the interpolation
            # rather than first undoing it (beyond the paper, like global_skip itself).
            with torch.no_grad():
                self.tail.weight.mul_(0.1)
                self.tail.bias.zero_()

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        head = self.head(lr)
        x = head + self.body_tail(self.body(head))
        out = self.tail(self.upsample(x))
        if self.global_skip:
            base = F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False)
            out = out + (base * 2 - 1)
        return out


def build_generator(model_cfg: Any, scale: int) -> SRResNet:
    """Build G from a ModelConfig (or any object with blocks/channels/global_skip)."""
    return SRResNet(
        blocks=model_cfg.blocks,
        channels=model_cfg.channels,
        scale=scale,
        global_skip=model_cfg.global_skip,
    )


def generator_spec(model: SRResNet) -> dict[str, Any]:
    """What is needed to rebuild the same network from saved weights."""
    return {
        "blocks": len(model.body),
        "channels": model.head[0].out_channels,
        "scale": model.scale,
        "global_skip": model.global_skip,
    }
