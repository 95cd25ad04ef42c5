"""VGG19 feature extractor phi(i, j) for the paper's content loss, loaded from the torch cache.

Only the convolutional trunk up to phi(i, j) is built and loaded: the 120 M-parameter
classifier of torchvision's VGG19 is never used, so it is neither initialised nor read from
disk (the weights file is memory-mapped when its format allows). The layer list is
torchvision's VGG19 ("E") layout, so its `features.<n>.*` keys load unchanged; the tests
check it against torchvision's own model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

#: torchvision's VGG19_Weights.IMAGENET1K_V1 (kept here so training never imports
#: torchvision's model zoo; a test pins it to torchvision's value).
VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
#: VGG19 ("E") trunk: conv widths, "M" = 2x2 max-pool. Each conv is followed by a ReLU.
VGG19_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
    512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)
#: phi(i, j) = output of the ReLU after conv j before max-pool i, as index+1 into features.
LAYER_END = {"vgg22": 9, "vgg54": 36}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The paper rescales VGG feature maps by 1/12.75 so the loss is comparable to pixel MSE.
FEATURE_SCALE = 1 / 12.75


class VGGWeightsMissing(FileNotFoundError):
    """The ImageNet VGG19 weights are not in the torch cache; the message says what to do."""


def weights_path() -> Path:
    """Where torchvision caches VGG19 ImageNet weights ($TORCH_HOME/hub/checkpoints/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(VGG19_URL).name


def vgg19_features(end: int) -> nn.Sequential:
    """torchvision's `vgg19().features[:end]`, same module indices (hence same state keys)."""
    layers: list[nn.Module] = []
    in_ch = 3
    for width in VGG19_LAYOUT:
        if isinstance(width, str):
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_ch = width
    return nn.Sequential(*layers[:end])


class VGGFeatures(nn.Module):
    """Frozen, eval-mode VGG19 truncated after phi(i, j); takes images in [-1, 1]."""

    def __init__(self, layer: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        if layer not in LAYER_END:
            raise ValueError(f"unknown VGG layer {layer!r}; choose one of {sorted(LAYER_END)}")
        self.features = vgg19_features(LAYER_END[layer])
        source = "the given VGG19 state dict"
        if state_dict is None:
            state_dict, source = load_vgg19_state_dict(), str(weights_path())
        own = self.features.state_dict()
        wanted = {}
        for key, value in own.items():
            theirs = state_dict.get(f"features.{key}")
            if theirs is None or theirs.shape != value.shape:
                raise VGGWeightsMissing(
                    f"{source}: 'features.{key}' is missing or has the wrong shape; these are "
                    f"not torchvision's VGG19 weights (expected {VGG19_URL})"
                )
            wanted[key] = theirs
        self.features.load_state_dict(wanted)
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
    """torchvision's VGG19 ImageNet weights from the torch hub cache (never downloaded here)."""
    path = weights_path()
    if not path.is_file():
        raise VGGWeightsMissing(
            f"VGG19 ImageNet weights not found at {path}. Copy {VGG19_URL} there (or set "
            "TORCH_HOME to a directory whose hub/checkpoints/ holds it), or set "
            "finetune.content_loss: mse in params.yaml."
        )
    try:
        try:  # zip-format files are memory-mapped: the unused classifier is never read
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy format (as the file torchvision ships) cannot be
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise VGGWeightsMissing(
            f"{path}: cannot be read as VGG19 weights ({err}); download {VGG19_URL} again, or "
            "set finetune.content_loss: mse in params.yaml"
        ) from None
