"""VGG19 feature extractor phi(i, j) for the paper's content loss, loaded from the torch cache."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import VGG19_Weights, vgg19

#: phi(i, j) = output of the ReLU after conv j before max-pool i, as index+1 into vgg19.features.
LAYER_END = {"vgg22": 9, "vgg54": 36}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The paper rescales VGG feature maps by 1/12.75 so the loss is comparable to pixel MSE.
FEATURE_SCALE = 1 / 12.75


class VGGWeightsMissing(FileNotFoundError):
    """The ImageNet VGG19 weights are not in the torch cache; the message says what to do."""


def weights_path() -> Path:
    """Where torchvision caches VGG19 ImageNet weights ($TORCH_HOME/hub/checkpoints/...)."""
    filename = Path(VGG19_Weights.IMAGENET1K_V1.url).name
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


class VGGFeatures(nn.Module):
    """Frozen, eval-mode VGG19 truncated after phi(i, j); takes images in [-1, 1]."""

    def __init__(self, layer: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        if layer not in LAYER_END:
            raise ValueError(f"unknown VGG layer {layer!r}; choose one of {sorted(LAYER_END)}")
        net = vgg19(weights=None)
        if state_dict is None:
            state_dict = load_vgg19_state_dict()
        net.load_state_dict(state_dict)
        self.features = net.features[: LAYER_END[layer]]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGGFeatures:
        """Stay in eval mode whatever the parent module does: the loss network is fixed."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x + 1) / 2 - self.mean) / self.std
        return self.features(x) * FEATURE_SCALE


def load_vgg19_state_dict() -> dict[str, torch.Tensor]:
    path = weights_path()
    if not path.is_file():
        raise VGGWeightsMissing(
            f"VGG19 ImageNet weights not found at {path}. Copy "
            f"{VGG19_Weights.IMAGENET1K_V1.url} there (or set TORCH_HOME to a directory whose "
            "hub/checkpoints/ holds it), or set finetune.content_loss: mse in params.yaml."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise VGGWeightsMissing(f"{path}: cannot be read as VGG19 weights ({err})") from None
