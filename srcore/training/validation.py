"""In-training validation on data.val (never a test set): PSNR-Y and NIQE of a few images.

Both, because the paper's trade is between them: during fine-tuning the MLflow run shows PSNR
falling and NIQE improving as the adversarial term takes effect (the paper's figure of SRGAN
quality against iterations), and pretraining shows whether MSE alone moves NIQE at all.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from srcore.config import Params
from srcore.data.datasets import Pair, load_pairs
from srcore.layout import Layout
from srcore.metrics import niqe_y, psnr_y
from srcore.training.runtime import autocast, memory_format
from srcore.upscale import lr_to_tensor, tensor_to_image


def validation_pairs(params: Params, layout: Layout, limit: int = 3,
                     max_lr: int = 160) -> list[Pair]:
    """A few validation images (data.val, never a test set), centre-cropped to at most
    max_lr LR pixels a side: cheap enough to score every val_every steps, and large enough
    (640 HR pixels at x4) for NIQE's 96x96 blocks. The training stage checked data.val with
    verify_prepared before the loop started."""
    pairs = load_pairs(layout.prepared_split("val"), params.data.val[0].name, params.scale,
                       verified=True)[:limit]
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
             device: torch.device) -> tuple[dict[str, float], list[np.ndarray]]:
    """Mean PSNR-Y and NIQE of `model` on `pairs`, and its SR images; leaves train/eval mode as
    found. NIQE is left out when no image is large enough for it (two 96x96 blocks)."""
    was_training = model.training
    model.eval()
    psnrs, niqes, images = [], [], []
    crop = params.evaluate.crop_border
    for p in pairs:
        with autocast(params, device):
            sr = model(lr_to_tensor(p.lr, device, memory_format(params)))
        img = tensor_to_image(sr, grey=p.hr.ndim == 2)
        psnrs.append(psnr_y(img, p.hr, crop))
        with contextlib.suppress(ValueError):  # too small or flat for NIQE: PSNR alone
            niqes.append(niqe_y(img, crop))
        images.append(img)
    model.train(was_training)
    scores = {"psnr_y": float(np.mean(psnrs))}
    if niqes:
        scores["niqe"] = float(np.mean(niqes))
    return scores, images
