"""Inference on images of any size: whole-image or tiled with overlap, shared by eval and CLI.

Tiling bounds memory by the tile, not the image. It is exact, not approximate, once every tile
carries at least the generator's receptive-field radius of context on each inner edge: each
tile's output is then cropped to its core, whose pixels saw the same inputs (and the same zero
padding at true image borders) as whole-image inference.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from srcore.data.images import to_rgb


def lr_to_tensor(lr: np.ndarray, device: torch.device | str = "cpu",
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 HxW(x3) -> float (1,3,H,W) in [0, 1], the generator's input range."""
    rgb = np.require(to_rgb(lr), requirements=["C", "W"])  # torch refuses read-only arrays
    t = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    return t.to(device, memory_format=memory_format)


def tensor_to_image(sr: torch.Tensor, grey: bool = False) -> np.ndarray:
    """(1,3,H,W) in [-1, 1] -> uint8 HxWx3, or HxW luma when the source image was grey."""
    img = ((sr[0].detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    arr = img.permute(1, 2, 0).numpy().astype(np.uint8)
    if grey:
        weights = np.array([0.299, 0.587, 0.114])
        arr = np.clip(np.rint(arr.astype(np.float64) @ weights), 0, 255).astype(np.uint8)
    return arr


def receptive_radius(model: nn.Module) -> int:
    """How many LR pixels of context one output pixel depends on, per side (rounded up).

    Sums each stride-1 convolution's radius, divided by the upsampling already applied before
    it (a 9x9 conv after x4 PixelShuffle reaches 1 LR pixel), over modules in definition order.
    That order is the forward order for SRResNet; residual adds and the bicubic global skip
    (2 LR pixels) never reach further than the longest conv chain, so this is an upper bound.
    SRResNet with B blocks: 8 + 2B (40 for the paper's B = 16).
    """
    radius, scale = 0.0, 1
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            if any(s != 1 for s in module.stride):
                raise ValueError(f"receptive_radius: strided conv {module} is not supported")
            reach = max(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size,
                                                        strict=True))
            radius += reach / scale
        elif isinstance(module, nn.PixelShuffle):
            scale *= module.upscale_factor
    return max(2, math.ceil(radius))


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """BatchNorm in training mode normalises by each tile's own statistics, so tiles would
    disagree with each other and with whole-image inference; restore the caller's mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def upscale_tensor(model: nn.Module, lr: torch.Tensor, scale: int, tile: int = 0,
                   overlap: int = 8) -> torch.Tensor:
    """Run G on (N,3,H,W) in eval mode; with tile > 0, on overlapping tiles stitched by core.

    Each core of `tile` x `tile` LR pixels is run with up to `overlap` extra LR pixels on every
    side, and only the core's output is kept. With overlap >= receptive_radius(model) the
    result equals whole-image inference to float rounding; a smaller overlap changes pixels
    near the seams.
    """
    if tile < 0 or overlap < 0:
        raise ValueError(f"tile and overlap must be >= 0, got tile={tile}, overlap={overlap}")
    n, _, h, w = lr.shape
    with _eval_mode(model):
        if tile == 0 or (h <= tile and w <= tile):
            return model(lr).float()
        out = torch.empty((n, 3, h * scale, w * scale), dtype=torch.float32, device=lr.device)
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                ye, xe = min(h, y + tile), min(w, x + tile)  # the core, in LR pixels
                y0, x0 = max(0, y - overlap), max(0, x - overlap)
                y1, x1 = min(h, ye + overlap), min(w, xe + overlap)
                sr = model(lr[:, :, y0:y1, x0:x1]).float()
                if sr.shape[-2:] != ((y1 - y0) * scale, (x1 - x0) * scale):
                    raise ValueError(f"model output {tuple(sr.shape)} is not x{scale} of its "
                                     f"input tile {(y1 - y0, x1 - x0)}; check `scale`")
                ty, tx = (y - y0) * scale, (x - x0) * scale
                th, tw = (ye - y) * scale, (xe - x) * scale
                out[:, :, y * scale:ye * scale, x * scale:xe * scale] = \
                    sr[:, :, ty:ty + th, tx:tx + tw]
        return out


def upscale_image(model: nn.Module, lr: np.ndarray, scale: int, tile: int = 0,
                  overlap: int = 8, device: torch.device | str = "cpu") -> np.ndarray:
    """uint8 LR -> uint8 SR; a grey input gives a grey output."""
    sr = upscale_tensor(model, lr_to_tensor(lr, device), scale, tile, overlap)
    return tensor_to_image(sr, grey=lr.ndim == 2)
