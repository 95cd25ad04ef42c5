"""SRGAN discriminator (Ledig et al. 2017, figure 4): 8 strided 3x3 convs, dense 1024, dense 1."""

from __future__ import annotations

import torch
from torch import nn

#: (out_channels, stride) of the 8 conv layers; stride 2 closes each pair.
LAYER_PLAN: tuple[tuple[int, int], ...] = (
    (64, 1), (64, 2), (128, 1), (128, 2), (256, 1), (256, 2), (512, 1), (512, 2),
)


class Discriminator(nn.Module):
    """Returns logits; the sigmoid lives in BCE-with-logits for numerical stability.

    The dense head needs a fixed input size (96x96 in the paper -> 6x6x512 features).
    """

    def __init__(self, hr_size: int = 96, base_channels: int = 64) -> None:
        super().__init__()
        if hr_size % 16:
            raise ValueError(f"discriminator input must be a multiple of 16, got {hr_size}")
        factor = base_channels / 64
        layers: list[nn.Module] = []
        in_ch = 3
        for i, (out, stride) in enumerate(LAYER_PLAN):
            out = max(1, int(out * factor))
            layers.append(nn.Conv2d(in_ch, out, 3, stride=stride, padding=1))
            if i > 0:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            in_ch = out
        self.features = nn.Sequential(*layers)
        side = hr_size // 16
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_ch * side * side, 1024),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(1024, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x)).squeeze(1)
