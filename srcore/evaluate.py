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
from srcore.figures import pyplot, save_figure
from srcore.layout import write_atomic
from srcore.metrics import luma, niqe_y, psnr_y, ssim_daala_y, ssim_y
from srcore.models.interpolate import blend
from srcore.precision import Precision
from srcore.precision import resolve as resolve_precision
from srcore.report import PAPER_TABLE2, table
from srcore.upscale import for_inference, receptive_radius, upscale_image

__all__ = ["METHODS", "METRICS", "PAPER_TABLE2", "evaluate", "gate_set", "table"]

#: The methods of the comparison grid; the alpha blends join them in the tables and the plane.
METHODS = ("bicubic", "srresnet", "srgan")
#: The HR images themselves: no distortion to measure, but the naturalness to aim for (NIQE).
REFERENCE = "hr"
#: Full-reference metrics, always computed per image; "lpips" joins them when available.
METRICS: dict[str, Callable[[np.ndarray, np.ndarray, int], float]] = {
    "psnr_y": psnr_y, "ssim_y": ssim_y, "ssim_daala_y": ssim_daala_y}
#: No-reference metrics, computed per image for every method and for HR.
NO_REFERENCE: dict[str, Callable[[np.ndarray, int], float]] = {"niqe": niqe_y}
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


def alpha_method(alpha: float) -> str:
    """Method name of the blend (1 - alpha) SRResNet + alpha SRGAN, e.g. alpha_0.25."""
    return f"alpha_{alpha:g}"


def with_blends(generators: dict[str, nn.Module], alphas: list[float]) -> dict[str, nn.Module]:
    """srresnet, its blends with srgan at each alpha, then srgan: the order of the curve."""
    if not alphas or not {"srresnet", "srgan"} <= generators.keys():
        return dict(generators)
    out = {"srresnet": generators["srresnet"]}
    for alpha in sorted(alphas):
        out[alpha_method(alpha)] = blend(generators["srresnet"], generators["srgan"], alpha)
    out["srgan"] = generators["srgan"]
    out.update({k: g for k, g in generators.items() if k not in out})
    return out


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


def _no_reference(image: np.ndarray, crop: int) -> dict[str, float]:
    """NIQE and its kin; NaN where undefined (an image under two 96x96 blocks, a flat one),
    which the summary skips and the CSV leaves empty: never a number that means nothing."""
    out = {}
    for name, fn in NO_REFERENCE.items():
        try:
            out[name] = fn(image, crop)
        except ValueError:
            out[name] = float("nan")
    return out


def score_set(pairs: list[Pair], generators: dict[str, nn.Module], params: Params,
              set_name: str, keep: int = 0, device: torch.device | str = "cpu",
              precision: Precision | None = None,
              memory_format: torch.memory_format = torch.contiguous_format,
              ) -> tuple[pd.DataFrame, dict[str, list[np.ndarray]]]:
    """Per-image rows (set, image, method, metrics...) and the first `keep` SR images of the
    grid's methods. Each method's output is scored on the full-reference metrics and NIQE;
    a row for HR itself carries its NIQE, the naturalness the methods aim for.

    Only the images a grid needs are kept, so a set of large images is scored one image at a
    time instead of holding every method's output for the whole set.
    """
    crop, scale = params.evaluate.crop_border, params.scale
    metrics = metric_functions()
    rows: list[dict[str, object]] = []
    images: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
    undefined = 0
    for i, p in enumerate(tqdm(pairs, desc=f"evaluate {set_name}", unit="img", leave=False)):
        outputs = {"bicubic": bicubic_upscale(p.lr, scale)}
        for name, g in generators.items():
            outputs[name] = upscale_image(g, p.lr, scale, params.evaluate.tile,
                                          params.evaluate.tile_overlap, device, memory_format,
                                          precision=precision)
        for method, sr in outputs.items():
            row: dict[str, object] = {"set": set_name, "image": p.name, "method": method}
            row.update({k: f(sr, p.hr, crop) for k, f in metrics.items()})
            row.update(_no_reference(sr, crop))
            rows.append(row)
            if i < keep and method in images:
                images[method].append(sr)
        reference = _no_reference(p.hr, crop)
        undefined += sum(1 for v in reference.values() if not np.isfinite(v))
        rows.append({"set": set_name, "image": p.name, "method": REFERENCE, **reference})
    if undefined:
        _note(f"evaluate: NIQE is undefined for {undefined} of {len(pairs)} {set_name} "
              "image(s) (under two 96x96 blocks after the border crop, or flat); their "
              "NIQE is left out of the mean")
    return pd.DataFrame(rows), images


def detail_box(a: np.ndarray, b: np.ndarray, height: int, width: int) -> tuple[int, int]:
    """Top-left (y, x) of the height x width window where Y of `a` and `b` differ most.

    Given SRResNet's and SRGAN's outputs, that is where the grid shows the trade: textures
    one model invents and the other blurs. Where they do not differ at all, the window with
    the most gradient energy of `a` (edges, texture) is taken instead of an arbitrary corner.
    """
    ya, yb = luma(a), luma(b)
    energy = (ya - yb) ** 2
    if not energy.any():
        energy = np.zeros_like(ya)
        energy[:, :-1] += np.diff(ya, axis=1) ** 2
        energy[:-1, :] += np.diff(ya, axis=0) ** 2
    integral = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = (integral[height:, width:] - integral[:-height, width:]
            - integral[height:, :-width] + integral[:-height, :-width])
    iy, ix = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(iy), int(ix)


def _outline(tile: np.ndarray, y: int, x: int, height: int, width_: int,
             width: int = 2) -> np.ndarray:
    """The tile with a red box where the detail crop was taken."""
    out = tile.copy()
    red = np.array([255, 0, 0], np.uint8)
    y1, x1 = y + height, x + width_
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

    The detail is the window where SRResNet and SRGAN differ most (`detail_box`), the same in
    every tile and outlined in red, with the tile's own aspect ratio, so that enlarged
    DETAIL_ZOOM x with nearest neighbour (pixels, not resampling) it fills its cell.
    """
    blocks = []
    for i, p in enumerate(pairs[:count]):
        lr_big = np.kron(to_rgb(p.lr), np.ones((scale, scale, 1), np.uint8))
        named = [("LR (nearest)", lr_big)]
        named += [(m, to_rgb(images[m][i])) for m in METHODS if len(images[m]) > i]
        named.append(("HR", to_rgb(p.hr)))
        h, w = p.hr.shape[:2]
        bh, bw = max(1, h // DETAIL_ZOOM), max(1, w // DETAIL_ZOOM)
        if all(len(images[m]) > i for m in ("srresnet", "srgan")):
            by, bx = detail_box(images["srresnet"][i], images["srgan"][i], bh, bw)
        else:
            by, bx = detail_box(p.hr, p.hr, bh, bw)
        columns = []
        for name, tile in named:
            tile = tile[:h, :w]
            detail = np.kron(tile[by:by + bh, bx:bx + bw],
                             np.ones((DETAIL_ZOOM, DETAIL_ZOOM, 1), np.uint8))
            detail = np.pad(detail, ((0, 0), (0, w - detail.shape[1]), (0, 0)),
                            constant_values=255)
            column = np.concatenate([_label(name, w), _outline(tile, by, bx, bh, bw),
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
    """Mean of every metric column per (set, method), rounded to 4 decimals.

    Undefined values (HR has no PSNR; NIQE of a too-small image) are skipped, and a metric
    with no value at all is left out: the summary never holds a NaN.
    """
    columns = [c for c in per_image.columns if c not in ("set", "image", "method")]
    means = per_image.groupby(["set", "method"], sort=False)[columns].mean()
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (set_name, method), row in means.iterrows():
        values = {c: round(float(row[c]), 4) for c in columns if np.isfinite(row[c])}
        if values:
            out.setdefault(str(set_name), {})[str(method)] = values
    return out


def plane_points(summary: dict[str, dict[str, dict[str, float]]]) -> pd.DataFrame:
    """The perception-distortion plane (Blau & Michaeli 2018) of every set: one row per method
    with its PSNR-Y and NIQE, and alpha (0 SRResNet, 1 SRGAN, the blends between)."""
    rows = []
    for set_name, methods in summary.items():
        for method, values in methods.items():
            if "niqe" not in values:
                continue
            alpha = {"srresnet": 0.0, "srgan": 1.0}.get(
                method, float(method.removeprefix("alpha_")) if method.startswith("alpha_")
                else float("nan"))
            rows.append({"set": set_name, "method": method, "alpha": alpha,
                         "psnr_y": values.get("psnr_y", float("nan")), "niqe": values["niqe"]})
    return pd.DataFrame(rows, columns=["set", "method", "alpha", "psnr_y", "niqe"])


def plot_plane(points: pd.DataFrame, set_name: str, path: Path) -> Path:
    """PSNR-Y against NIQE for one set: bicubic, the alpha curve from SRResNet to SRGAN, and
    HR's NIQE as the line to reach (HR has no distortion, so no PSNR). Axes fit the data."""
    plt = pyplot()
    own = points[points["set"] == set_name]
    curve = own[own["alpha"].notna()].sort_values("alpha")
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    ax.plot(curve["psnr_y"], curve["niqe"], "-o", color="tab:blue", label="SRResNet → SRGAN")
    for _, r in curve.iterrows():
        ax.annotate(r["method"] if r["method"] in ("srresnet", "srgan")
                    else f"α={r['alpha']:g}", (r["psnr_y"], r["niqe"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    bicubic = own[own["method"] == "bicubic"]
    if len(bicubic):
        ax.plot(bicubic["psnr_y"], bicubic["niqe"], "s", color="tab:gray", label="bicubic")
        ax.annotate("bicubic", (bicubic["psnr_y"].iloc[0], bicubic["niqe"].iloc[0]),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    hr = own[own["method"] == REFERENCE]
    if len(hr):
        ax.axhline(hr["niqe"].iloc[0], color="tab:green", linestyle="--",
                   label=f"HR (NIQE {hr['niqe'].iloc[0]:.2f})")
    ax.set_xlabel("PSNR-Y (dB) → less distortion")
    ax.set_ylabel("NIQE ↓ more natural")
    ax.set_title(f"Perception-distortion plane: {set_name}")
    ax.margins(0.15)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


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
             metrics_path: Path, plot_path: Path, reports: Path,
             precision: Precision | None = None, *,
             verified: bool = False) -> tuple[dict, list[Path]]:
    """Score every validation and test set; write metrics JSON, per-image CSV, the plane's
    points beside it, one grid PNG and one perception-distortion plot per set. Validation sets
    are scored because the registry gate reads them. Returns the summary and the images.

    The generators run at `precision` (default: runtime.precision resolved for the device),
    as `srgan upscale` runs them: bf16 where the hardware runs it natively moves PSNR-Y by
    about a thousandth of a dB and runs the alpha sweep 2.7x faster; fp32 is exact.
    `verified`: the caller has just checked the sets with verify_prepared (load_pairs).
    """
    from srcore.training.runtime import memory_format, resolve_device

    device = resolve_device(params.runtime.device)
    chosen = precision or resolve_precision(params.runtime.precision, device)
    fmt = memory_format(params)
    blends = with_blends({k: g.to(device).eval() for k, g in generators.items()},
                         params.evaluate.alphas)
    warn_if_overlap_short(blends, params)
    generators = {k: for_inference(g, chosen, fmt).to(device, memory_format=fmt)
                  for k, g in blends.items()}
    frames, grids = [], []
    keep = params.evaluate.grid_images
    with torch.inference_mode(), _exact_fp32():
        for spec in params.data.scored_sets:
            pairs = load_pairs(prepared / params.data.split_of(spec.name), spec.name,
                               params.scale, verified=verified)
            frame, images = score_set(pairs, generators, params, spec.name, keep, device,
                                      chosen, fmt)
            frames.append(frame)
            grid = comparison_grid(pairs, images, params.scale, keep)
            if grid is not None:
                path = reports / f"grid_{spec.name}.png"
                save_png(grid, path)
                grids.append(path)
    per_image = pd.concat(frames, ignore_index=True)
    summary = summarise(per_image)
    points = plane_points(summary)
    for set_name in points["set"].unique():
        grids.append(plot_plane(points, str(set_name), reports /
                                f"perception_distortion_{str(set_name).lower()}.png"))
    write_atomic(metrics_path, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    _write_csv(per_image, plot_path)
    _write_csv(points, plot_path.with_name("perception_distortion.csv"))
    return summary, grids


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.round(4).to_csv(tmp, index=False)
    os.replace(tmp, path)
