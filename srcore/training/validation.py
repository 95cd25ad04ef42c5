"""In-training validation: PSNR-Y of a few centre crops of data.val (never a test set)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from srcore.config import Params
from srcore.data.datasets import Pair, load_pairs
from srcore.layout import Layout
from srcore.metrics import psnr_y
from srcore.training.runtime import autocast, memory_format
from srcore.upscale import lr_to_tensor, tensor_to_image


def validation_pairs(params: Params, layout: Layout, limit: int = 3,
                     max_lr: int = 96) -> list[Pair]:
    """A few centre-cropped validation images (data.val, never a test set): cheap enough to
    score every val_every steps."""
    pairs = load_pairs(layout.prepared, params.data.val[0].name, params.scale)[:limit]
    out = []
    for p in pairs:
        h, w = p.lr.shape[:2]
        ch, cw = min(h, max_lr), min(w, max_lr)
        y, x = (h - ch) // 2, (w - cw) // 2
        s = params.scale
        out.append(Pair(p.name, p.hr[y * s:(y + ch) * s, x * s:(x + cw) * s],
                        p.lr[y:y + ch, x:x + cw]))
    return out


@torch.no_grad()
def validate(model: nn.Module, pairs: list[Pair], params: Params,
             device: torch.device) -> tuple[float, list[np.ndarray]]:
    """Mean PSNR-Y of `model` on `pairs` and its SR images; leaves train/eval mode as found."""
    was_training = model.training
    model.eval()
    scores, images = [], []
    for p in pairs:
        with autocast(params, device):
            sr = model(lr_to_tensor(p.lr, device, memory_format(params)))
        img = tensor_to_image(sr, grey=p.hr.ndim == 2)
        scores.append(psnr_y(img, p.hr, params.evaluate.crop_border))
        images.append(img)
    model.train(was_training)
    return float(np.mean(scores)), images
