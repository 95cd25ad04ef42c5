"""Speed and MATLAB-parity benchmark for srcore.data.degrade.bicubic_lr.

Usage: python benchmarks/degrade_speed.py [--repeats N] [--scale 4] [--datasets DIR]

Speed: bicubic_lr on a synthetic 2040x1356 RGB uint8 image (DIV2K size), pinned to one thread
so the number is comparable across machines.  Parity: per benchmark set, how many of our LR
images are bit-identical to MATLAB's ``LR_bicubic_X4`` and the mean PSNR against them, next to
Pillow's BICUBIC for comparison.
"""

from __future__ import annotations

import os

# Pin BLAS/OpenMP pools to one thread before numpy is imported (they read these at load time).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from srcore.data.degrade import bicubic_lr  # noqa: E402

SETS = ("Set5", "Set14", "BSD100")


def _default_datasets() -> Path:
    env = os.environ.get("SRGAN_SHARED_DATASETS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "datasets"


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR over all channels of two uint8 images (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def bench_speed(repeats: int, scale: int, warmup: int = 1) -> tuple[float, float]:
    """Median and best ms/image for bicubic_lr on a 2040x1356 RGB uint8 image."""
    img = np.random.default_rng(0).integers(0, 256, (1356, 2040, 3), dtype=np.uint8)
    for _ in range(warmup):
        bicubic_lr(img, scale)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        bicubic_lr(img, scale)
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times), min(times)


def parity(datasets: Path) -> None:
    """Print, per set, identical-image count and mean PSNR for ours and for Pillow BICUBIC."""
    print(f"parity vs MATLAB imresize(HR, 1/4, 'bicubic') LR images in {datasets}")
    print("(PSNR in dB on uint8, all channels; * = mean over the non-identical images only)")
    print(f"{'set':8s} {'n':>4s} {'identical':>10s} {'PSNR ours':>10s} {'PSNR Pillow':>12s}")
    for name in SETS:
        hr_paths = sorted((datasets / name / "HR").glob("*.png"))
        if not hr_paths:
            print(f"{name:8s}  (missing)")
            continue
        same, ours_psnr, pil_psnr = 0, [], []
        for hr_path in hr_paths:
            lr_path = hr_path.parent.parent / "LR_bicubic_X4" / hr_path.name.replace("_HR.", "_LR.")
            hr = np.asarray(Image.open(hr_path))  # no convert(): grey stays grey, as MATLAB
            ref = np.asarray(Image.open(lr_path))
            ours = bicubic_lr(hr, 4)
            pil = np.asarray(
                Image.fromarray(hr).resize((ref.shape[1], ref.shape[0]), Image.Resampling.BICUBIC)
            )
            same += int(ours.shape == ref.shape and np.array_equal(ours, ref))
            ours_psnr.append(psnr_uint8(ours, ref))
            pil_psnr.append(psnr_uint8(pil, ref))
        # inf only when every image is identical; otherwise average the non-identical ones.
        finite = [p for p in ours_psnr if math.isfinite(p)]
        ours_txt = f"{statistics.fmean(finite):.2f}*" if finite else "inf"
        n = len(hr_paths)
        print(
            f"{name:8s} {n:4d} {same:>6d}/{n:<3d} {ours_txt:>10s} "
            f"{statistics.fmean(pil_psnr):>12.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed runs (default 10)")
    parser.add_argument("--scale", type=int, default=4, help="downscale factor (default 4)")
    parser.add_argument(
        "--datasets",
        type=Path,
        default=_default_datasets(),
        help="folder holding Set5/Set14/BSD100 (default ../shared/datasets)",
    )
    parser.add_argument("--skip-parity", action="store_true", help="only time the resize")
    args = parser.parse_args(argv)

    threads = os.environ.get("OMP_NUM_THREADS")
    median_ms, best_ms = bench_speed(args.repeats, args.scale)
    print(
        f"bicubic_lr x{args.scale} on 2040x1356 RGB uint8, {args.repeats} repeats, "
        f"OMP_NUM_THREADS={threads}"
    )
    print(
        f"  median {median_ms:.1f} ms/image ({1000.0 / median_ms:.2f} images/s), "
        f"best {best_ms:.1f} ms/image ({1000.0 / best_ms:.2f} images/s)"
    )
    if not args.skip_parity:
        if args.datasets.is_dir():
            parity(args.datasets)
        else:
            print(f"parity skipped: {args.datasets} not found (set --datasets)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
