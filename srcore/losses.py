"""Pixel, content and adversarial losses of the paper (section 2.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from srcore.models.vgg import VGGFeatures


class ContentLoss(nn.Module):
    """l_MSE on pixels ([-1, 1] range) or l_VGG/i.j on VGG19 features (scaled by 1/12.75)."""

    def __init__(self, kind: str, vgg_state_dict: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.vgg = None if kind == "mse" else VGGFeatures(kind, vgg_state_dict)

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        if self.vgg is None:
            return F.mse_loss(sr, hr)
        with torch.no_grad():  # the target's features need no graph
            target = self.vgg(hr)
        return F.mse_loss(self.vgg(sr), target)


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(G(x)) in the stable logits form (the paper's non-saturating generator loss).

    BCE-with-logits against 1 is softplus(-logit): exact, and finite for any logit, where
    -log(sigmoid(logit)) overflows to inf once sigmoid underflows to 0.
    """
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def discriminator_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss on real, loss on fake); D maximises log D(HR) + log(1 - D(G(LR)))."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real, fake
