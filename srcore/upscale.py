"""Inference on images of any size: whole-image or tiled with overlap, shared by eval and CLI."""

from __future__ import annotations

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


@torch.no_grad()
def upscale_tensor(model: nn.Module, lr: torch.Tensor, scale: int, tile: int = 0,
                   overlap: int = 8) -> torch.Tensor:
    """Run G on (1,3,H,W); with tile > 0, on overlapping tiles whose centres are stitched.

    Each tile is cropped back to its own core region (overlap discarded on inner edges), so
    seams see the same receptive field as whole-image inference up to the overlap width.
    """
    _, _, h, w = lr.shape
    if tile <= 0 or (h <= tile and w <= tile):
        return model(lr)
    out = torch.empty((1, 3, h * scale, w * scale), dtype=torch.float32, device=lr.device)
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            y0, x0 = max(0, y - overlap), max(0, x - overlap)
            y1, x1 = min(h, y + tile + overlap), min(w, x + tile + overlap)
            sr = model(lr[:, :, y0:y1, x0:x1]).float()
            ty, tx = (y - y0) * scale, (x - x0) * scale
            th, tw = (min(h, y + tile) - y) * scale, (min(w, x + tile) - x) * scale
            out[:, :, y * scale:y * scale + th, x * scale:x * scale + tw] = \
                sr[:, :, ty:ty + th, tx:tx + tw]
    return out


def upscale_image(model: nn.Module, lr: np.ndarray, scale: int, tile: int = 0,
                  overlap: int = 8, device: torch.device | str = "cpu") -> np.ndarray:
    """uint8 LR -> uint8 SR; a grey input gives a grey output."""
    model.eval()
    sr = upscale_tensor(model, lr_to_tensor(lr, device), scale, tile, overlap)
    return tensor_to_image(sr, grey=lr.ndim == 2)
