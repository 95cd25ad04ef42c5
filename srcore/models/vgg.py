"""VGG19 feature extractor phi(i, j) for the paper's content loss, loaded from the torch cache.

The weights are torchvision's file, cached where torchvision caches it
($TORCH_HOME/hub/checkpoints/). When it is missing it is fetched as torch.hub would (verified
against the hash prefix in its file name), but with resume, retries and a progress bar; an
offline machine gets the same advice as before (where to put the file, or the MSE loss).

Only the convolutional trunk up to phi(i, j) is built and loaded: the 120 M-parameter
classifier of torchvision's VGG19 is never used, so it is neither initialised nor read from
disk (the weights file is memory-mapped when its format allows). The layer list is
torchvision's VGG19 ("E") layout, so its `features.<n>.*` keys load unchanged; the tests
check it against torchvision's own model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import torch
from torch import nn

#: torchvision's VGG19_Weights.IMAGENET1K_V1 (kept here so training never imports
#: torchvision's model zoo; a test pins it to torchvision's value).
VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
#: Set to fetch from elsewhere (a mirror, a local server); set empty to never fetch.
URL_ENV = "SRGAN_VGG19_URL"
#: torch.hub's rule: the hex digits after the last '-' of the file name start its sha256.
HASH_PREFIX_RE = re.compile(r"-([a-f0-9]*)\.")
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


def vgg19_url() -> str | None:
    """$SRGAN_VGG19_URL when set (None when set empty: never fetch), else VGG19_URL."""
    url = os.environ.get(URL_ENV)
    if url is None:
        return VGG19_URL
    return url.strip() or None


def weights_path(url: str | None = None) -> Path:
    """Where torch.hub caches the file `url` names ($TORCH_HOME/hub/checkpoints/<name>);
    by default torchvision's VGG19 ImageNet weights, or the file $SRGAN_VGG19_URL names."""
    name = Path(urlsplit(url or vgg19_url() or VGG19_URL).path).name
    return Path(torch.hub.get_dir()) / "checkpoints" / name


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


def _advice() -> str:
    return (f"Copy {VGG19_URL} there (or set TORCH_HOME to a directory whose hub/checkpoints/ "
            "holds it), or set finetune.content_loss: mse in params.yaml.")


def _fetch(url: str, path: Path, retries: int | None, timeout: float | None) -> None:
    """Download `url` to `path` as torch.hub would: verified against the hash prefix in its
    file name, and moved into the cache only once verified (a mismatch leaves nothing)."""
    from srcore.data.download import ChecksumMismatch, DownloadError, download

    match = HASH_PREFIX_RE.search(path.name)
    prefix = match.group(1) if match else None
    options: dict[str, int | float] = {}
    if retries is not None:
        options["retries"] = retries
    if timeout is not None:
        options["timeout"] = timeout
    try:
        download(url, path, sha256_prefix=prefix, **options)
    except ChecksumMismatch as err:
        raise VGGWeightsMissing(
            f"VGG19 weights fetched from {url} failed verification: their sha256 {err.actual} "
            f"does not start with {prefix} as the name {path.name} requires; deleted them. "
            f"{_advice()}"
        ) from None
    except DownloadError as err:
        raise VGGWeightsMissing(
            f"VGG19 ImageNet weights not found at {path}, and fetching them failed ({err}). "
            f"{_advice()}"
        ) from None


def load_vgg19_state_dict(
    url: str | None = None, *, retries: int | None = None, timeout: float | None = None
) -> dict[str, torch.Tensor]:
    """torchvision's VGG19 ImageNet weights from the torch hub cache, fetched when missing.

    `url` defaults to $SRGAN_VGG19_URL, else VGG19_URL (set the variable empty to never
    fetch). A cached file is used as it is, unhashed, as torchvision does; a fetched one must
    have a sha256 starting with the hex digits between '-' and '.' in its file name, when it
    has them (torch.hub's rule: vgg19-dcbb9e9d.pth). Fetching resumes from `<file>.part`,
    retries, shows a progress bar and renames into the cache only once verified; `retries` and
    `timeout` default to srcore.data.download's (pass params.yaml's download.* to follow it).
    Raises VGGWeightsMissing (one line: where the file belongs, and the MSE alternative).
    """
    url = url or vgg19_url()
    path = weights_path(url)
    if not path.is_file() and url is None:
        raise VGGWeightsMissing(f"VGG19 ImageNet weights not found at {path} (fetching is off: "
                                f"{URL_ENV} is empty). {_advice()}")
    if not path.is_file():
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        # One fetch per machine: ranks of a torchrun job (or two jobs) share the torch cache.
        with FileLock(str(path) + ".lock"):
            if not path.is_file():
                _fetch(url, path, retries, timeout)
    try:
        try:  # zip-format files are memory-mapped: the unused classifier is never read
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy format (as the file torchvision ships) cannot be
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise VGGWeightsMissing(
            f"{path}: cannot be read as VGG19 weights ({err}); delete it to fetch "
            f"{url or VGG19_URL} again, or set finetune.content_loss: mse in params.yaml"
        ) from None
