"""Benchmark evaluation: bicubic, SRResNet and SRGAN on every test set, the field's protocol.

PSNR and SSIM on the Y channel with a border crop (srcore.metrics); grey images are scored on
their own values, as the field's MATLAB scripts do. Bicubic is MATLAB imresize x4 of the LR.
Both SSIMs are reported: Wang's (what later work quotes) and daala's (what the paper's Table 2
used), so our table stands beside the paper's like for like. LPIPS is added when the `lpips`
package and its AlexNet weights are already on this machine; evaluation never downloads.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw
from torch import nn
from tqdm import tqdm

from srcore.config import Params
from srcore.data.datasets import Pair, load_pairs
from srcore.data.degrade import imresize
from srcore.data.images import save_png, to_rgb
from srcore.metrics import luma, psnr_y, ssim_daala_y, ssim_y
from srcore.report import PAPER_TABLE2, table
from srcore.upscale import receptive_radius, upscale_image

__all__ = ["METHODS", "METRICS", "PAPER_TABLE2", "evaluate", "gate_set", "table"]

METHODS = ("bicubic", "srresnet", "srgan")
#: Always computed, per image; "lpips" joins them when available (see lpips_scorer).
METRICS: dict[str, Callable[[np.ndarray, np.ndarray, int], float]] = {
    "psnr_y": psnr_y, "ssim_y": ssim_y, "ssim_daala_y": ssim_daala_y}
#: Nearest-neighbour enlargement of the detail crop under each grid tile.
DETAIL_ZOOM = 4

Scorer = Callable[[np.ndarray, np.ndarray, int], float]


def _note(message: str) -> None:
    """On stderr and through tqdm, so progress bars and the stdout table stay intact."""
    tqdm.write(message, file=sys.stderr)


@functools.cache
def lpips_scorer() -> Scorer | None:
    """LPIPS (AlexNet) when `lpips` imports and its weights are cached; else None, noted once.

    The weights check comes first because lpips would otherwise try to download AlexNet, which
    hangs or fails on an offline machine. Cached so the note is printed once per process.
    """
    try:
        import lpips  # type: ignore[import-not-found]
    except ImportError:
        _note("evaluate: LPIPS skipped: the `lpips` package is not installed "
              "(pip install lpips, with AlexNet weights in the torch hub cache, to add it)")
        return None
    from torchvision.models import AlexNet_Weights

    weights = Path(torch.hub.get_dir()) / "checkpoints" / Path(
        AlexNet_Weights.IMAGENET1K_V1.url).name
    if not weights.is_file():
        _note(f"evaluate: LPIPS skipped: AlexNet weights not found at {weights} "
              "(evaluation never downloads; copy the file there to add LPIPS)")
        return None
    try:
        net = lpips.LPIPS(net="alex", verbose=False).eval()
    except Exception as err:  # noqa: BLE001 - any failure to build it means "skip LPIPS"
        _note(f"evaluate: LPIPS skipped: could not load it offline ({type(err).__name__}: "
              f"{err})")
        return None

    @torch.no_grad()
    def score(sr: np.ndarray, hr: np.ndarray, crop: int) -> float:
        def tensor(img: np.ndarray) -> torch.Tensor:
            rgb = to_rgb(img)
            if crop:
                rgb = rgb[crop:-crop, crop:-crop]
            t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
            return t / 127.5 - 1  # LPIPS expects RGB in [-1, 1]

        return float(net(tensor(sr), tensor(hr)).mean())

    return score


def metric_functions() -> dict[str, Scorer]:
    scorer = lpips_scorer()
    return {**METRICS, "lpips": scorer} if scorer is not None else dict(METRICS)


def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    return imresize(lr, float(scale))


def gate_set(params: Params) -> str:
    """The validation set the registry's promotion gate compares on (tracking.gate_set).

    config.py already refuses a gate_set outside data.val, so this only resolves the default.
    """
    return params.tracking.gate_set or params.data.val[0].name


def warn_if_overlap_short(generators: dict[str, nn.Module], params: Params) -> None:
    """Tiles with less context than the receptive field differ from whole-image inference."""
    if params.evaluate.tile <= 0:
        return
    for name, g in generators.items():
        radius = receptive_radius(g)
        if params.evaluate.tile_overlap < radius:
            _note(f"evaluate: evaluate.tile_overlap={params.evaluate.tile_overlap} is below "
                  f"{name}'s receptive-field radius ({radius} LR pixels): pixels near tile "
                  f"seams differ from whole-image inference; set evaluate.tile_overlap: "
                  f"{radius} for exact results")


def score_set(pairs: list[Pair], generators: dict[str, nn.Module], params: Params,
              set_name: str, keep: int = 0, device: torch.device | str = "cpu"
              ) -> tuple[pd.DataFrame, dict[str, list[np.ndarray]]]:
    """Per-image rows (set, image, method, metrics...) and the first `keep` SR images per method.

    Only the images a grid needs are kept, so a set of large images is scored one image at a
    time instead of holding every method's output for the whole set.
    """
    crop, scale = params.evaluate.crop_border, params.scale
    metrics = metric_functions()
    rows: list[dict[str, object]] = []
    images: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
    for i, p in enumerate(tqdm(pairs, desc=f"evaluate {set_name}", unit="img", leave=False)):
        outputs = {"bicubic": bicubic_upscale(p.lr, scale)}
        for name, g in generators.items():
            outputs[name] = upscale_image(g, p.lr, scale, params.evaluate.tile,
                                          params.evaluate.tile_overlap, device)
        for method, sr in outputs.items():
            row: dict[str, object] = {"set": set_name, "image": p.name, "method": method}
            row.update({k: f(sr, p.hr, crop) for k, f in metrics.items()})
            rows.append(row)
            if i < keep:
                images[method].append(sr)
    return pd.DataFrame(rows), images


def detail_box(hr: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left (y, x) of the size x size window with the most HR gradient energy on Y.

    That is where methods differ most (edges, texture); a flat sky crop would show nothing.
    """
    y = luma(hr)
    energy = np.zeros_like(y)
    energy[:, :-1] += np.diff(y, axis=1) ** 2
    energy[:-1, :] += np.diff(y, axis=0) ** 2
    integral = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = (integral[size:, size:] - integral[:-size, size:]
            - integral[size:, :-size] + integral[:-size, :-size])
    iy, ix = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(iy), int(ix)


def _outline(tile: np.ndarray, y: int, x: int, size: int, width: int = 2) -> np.ndarray:
    """The tile with a red box where the detail crop was taken."""
    out = tile.copy()
    red = np.array([255, 0, 0], np.uint8)
    y1, x1 = y + size, x + size
    out[y:y + width, x:x1] = red
    out[y1 - width:y1, x:x1] = red
    out[y:y1, x:x + width] = red
    out[y:y1, x1 - width:x1] = red
    return out


def _label(text: str, width: int, height: int = 14) -> np.ndarray:
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(strip).text((2, 1), text, fill=(0, 0, 0))
    return np.asarray(strip)


def comparison_grid(pairs: list[Pair], images: dict[str, list[np.ndarray]], scale: int,
                    count: int, pad: int = 4) -> np.ndarray | None:
    """Per image: LR (nearest) | bicubic | SRResNet | SRGAN | HR, each over a zoomed detail.

    The detail is the same HR-gradient-richest square in every tile (outlined in red),
    enlarged DETAIL_ZOOM x with nearest neighbour so the reader sees pixels, not resampling.
    """
    blocks = []
    for i, p in enumerate(pairs[:count]):
        lr_big = np.kron(to_rgb(p.lr), np.ones((scale, scale, 1), np.uint8))
        named = [("LR (nearest)", lr_big)]
        named += [(m, to_rgb(images[m][i])) for m in METHODS if len(images[m]) > i]
        named.append(("HR", to_rgb(p.hr)))
        h, w = p.hr.shape[:2]
        size = max(1, min(h, w) // DETAIL_ZOOM)
        by, bx = detail_box(p.hr, size)
        columns = []
        for name, tile in named:
            tile = tile[:h, :w]
            detail = np.kron(tile[by:by + size, bx:bx + size],
                             np.ones((DETAIL_ZOOM, DETAIL_ZOOM, 1), np.uint8))
            detail = np.pad(detail, ((0, 0), (0, w - detail.shape[1]), (0, 0)),
                            constant_values=255)
            column = np.concatenate([_label(name, w), _outline(tile, by, bx, size),
                                     np.full((pad, w, 3), 255, np.uint8), detail], axis=0)
            columns.append(np.pad(column, ((0, 0), (0, pad), (0, 0)), constant_values=255))
        blocks.append(np.concatenate(columns, axis=1))
    if not blocks:
        return None
    width = max(b.shape[1] for b in blocks)
    blocks = [np.pad(b, ((0, pad), (0, width - b.shape[1]), (0, 0)), constant_values=255)
              for b in blocks]
    return np.concatenate(blocks, axis=0)


def summarise(per_image: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """Mean of every metric column per (set, method), rounded to 4 decimals."""
    columns = [c for c in per_image.columns if c not in ("set", "image", "method")]
    means = per_image.groupby(["set", "method"], sort=False)[columns].mean()
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (set_name, method), row in means.iterrows():
        out.setdefault(str(set_name), {})[str(method)] = {
            c: round(float(row[c]), 4) for c in columns}
    return out


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _exact_fp32() -> Iterator[None]:
    """TF32 convolutions (PyTorch's cuDNN default) move PSNR in the third decimal on a GPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def evaluate(params: Params, prepared: Path, generators: dict[str, nn.Module],
             metrics_path: Path, plot_path: Path, reports: Path) -> tuple[dict, list[Path]]:
    """Score every validation and test set; write metrics JSON, per-image CSV and one grid PNG
    per set. Validation sets are scored because the registry gate reads them."""
    from srcore.train import resolve_device

    device = resolve_device(params.runtime.device)
    generators = {k: g.to(device).eval() for k, g in generators.items()}
    warn_if_overlap_short(generators, params)
    frames, grids = [], []
    keep = params.evaluate.grid_images
    with torch.inference_mode(), _exact_fp32():
        for spec in params.data.scored_sets:
            pairs = load_pairs(prepared, spec.name, params.scale)
            frame, images = score_set(pairs, generators, params, spec.name, keep, device)
            frames.append(frame)
            grid = comparison_grid(pairs, images, params.scale, keep)
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
