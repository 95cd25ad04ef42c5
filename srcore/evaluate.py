"""Benchmark evaluation: bicubic, SRResNet and SRGAN on every test set, the field's protocol.

PSNR and SSIM on the Y channel with a border crop (srcore.metrics); grey images are scored on
their own values, as the field's MATLAB scripts do. Bicubic is MATLAB imresize x4 of the LR.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from srcore.config import Params
from srcore.data.datasets import Pair, load_pairs
from srcore.data.degrade import imresize
from srcore.data.images import save_png, to_rgb
from srcore.metrics import psnr_y, ssim_y
from srcore.upscale import upscale_image

METHODS = ("bicubic", "srresnet", "srgan")

#: Table 2 of the paper, PSNR / SSIM (daala SSIM), 4x.
PAPER_TABLE2 = {
    "set5": {"bicubic": (28.43, 0.8211), "srresnet": (32.05, 0.9019), "srgan": (29.40, 0.8472)},
    "set14": {"bicubic": (25.99, 0.7486), "srresnet": (28.49, 0.8184), "srgan": (26.02, 0.7397)},
    "bsd100": {"bicubic": (25.94, 0.6935), "srresnet": (27.58, 0.7620), "srgan": (25.16, 0.6688)},
}


def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    return imresize(lr, float(scale))


def score_set(pairs: list[Pair], generators: dict[str, nn.Module], params: Params,
              set_name: str) -> tuple[pd.DataFrame, dict[str, list[np.ndarray]]]:
    """Per-image rows (set, image, method, psnr_y, ssim_y) and the SR images for grids."""
    crop, scale = params.evaluate.crop_border, params.scale
    rows: list[dict[str, object]] = []
    images: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
    for p in tqdm(pairs, desc=f"evaluate {set_name}", unit="img", leave=False):
        outputs = {"bicubic": bicubic_upscale(p.lr, scale)}
        for name, g in generators.items():
            outputs[name] = upscale_image(g, p.lr, scale, params.evaluate.tile,
                                          params.evaluate.tile_overlap)
        for method, sr in outputs.items():
            rows.append({"set": set_name, "image": p.name, "method": method,
                         "psnr_y": psnr_y(sr, p.hr, crop), "ssim_y": ssim_y(sr, p.hr, crop)})
            images[method].append(sr)
    return pd.DataFrame(rows), images


def comparison_grid(pairs: list[Pair], images: dict[str, list[np.ndarray]], scale: int,
                    count: int, pad: int = 4) -> np.ndarray | None:
    """Rows of LR (nearest-upsampled) | bicubic | SRResNet | SRGAN | HR for `count` images."""
    rows = []
    for i, p in enumerate(pairs[:count]):
        lr_big = np.kron(to_rgb(p.lr), np.ones((scale, scale, 1), np.uint8))
        tiles = [lr_big] + [to_rgb(images[m][i]) for m in METHODS if images[m]] + [to_rgb(p.hr)]
        h = max(t.shape[0] for t in tiles)
        padded = [np.pad(t, ((0, h - t.shape[0]), (0, pad), (0, 0)), constant_values=255)
                  for t in tiles]
        rows.append(np.concatenate(padded, axis=1))
    if not rows:
        return None
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, pad), (0, width - r.shape[1]), (0, 0)), constant_values=255)
            for r in rows]
    return np.concatenate(rows, axis=0)


def summarise(per_image: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    means = per_image.groupby(["set", "method"], sort=False)[["psnr_y", "ssim_y"]].mean()
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (set_name, method), row in means.iterrows():
        out.setdefault(str(set_name), {})[str(method)] = {
            "psnr_y": round(float(row["psnr_y"]), 4), "ssim_y": round(float(row["ssim_y"]), 4)}
    return out


def table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table of PSNR / SSIM (Wang) per set and method, with the paper's where known."""
    lines = ["| set | method | PSNR-Y (dB) | SSIM-Y (Wang) | paper PSNR / SSIM (daala) |",
             "|---|---|---|---|---|"]
    for set_name, methods in summary.items():
        for method, m in methods.items():
            paper = PAPER_TABLE2.get(set_name.lower(), {}).get(method)
            ref = f"{paper[0]:.2f} / {paper[1]:.4f}" if paper else "-"
            lines.append(f"| {set_name} | {method} | {m['psnr_y']:.2f} | {m['ssim_y']:.4f} "
                         f"| {ref} |")
    return "\n".join(lines)


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def evaluate(params: Params, prepared: Path, generators: dict[str, nn.Module],
             metrics_path: Path, plot_path: Path, reports: Path) -> tuple[dict, list[Path]]:
    """Score every test set; write metrics JSON, per-image CSV and one grid PNG per set."""
    torch.set_grad_enabled(False)
    frames, grids = [], []
    for spec in params.data.test:
        pairs = load_pairs(prepared, spec.name)
        frame, images = score_set(pairs, generators, params, spec.name)
        frames.append(frame)
        grid = comparison_grid(pairs, images, params.scale, params.evaluate.grid_images)
        if grid is not None:
            path = reports / f"grid_{spec.name}.png"
            save_png(grid, path)
            grids.append(path)
    per_image = pd.concat(frames, ignore_index=True)
    summary = summarise(per_image)
    _atomic_text(metrics_path, json.dumps(summary, indent=2) + "\n")
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plot_path.with_name(f".{plot_path.name}.tmp")
    per_image.round(4).to_csv(tmp, index=False)
    os.replace(tmp, plot_path)
    return summary, grids
