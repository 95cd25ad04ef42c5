"""Speed of srcore.metrics.niqe_y on one core.

Usage: python benchmarks/niqe_speed.py [--repeats N] [--datasets DIR]

Pinned to one thread so the figure is comparable across machines. Prints the median ms for
one 512x512 RGB image (Set5 img_001 when the shared datasets are present, else a synthetic
textured image of that size) and the median ms per Set14 HR image (all 14 in one pass,
divided by 14), both with the 4-pixel crop SR papers use. The first call (which loads and
checks the pristine model and builds the AGGD table) is a warm-up and is not timed.
"""

from __future__ import annotations

import os

# Pin BLAS/OpenMP pools to one thread before numpy is imported (they read these at load time).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from srcore.data.images import list_images, load_image  # noqa: E402
from srcore.metrics import niqe_y  # noqa: E402


def _default_datasets() -> Path:
    env = os.environ.get("SRGAN_SHARED_DATASETS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "datasets"


def _median_ms(images: list[np.ndarray], repeats: int) -> float:
    """Median over ``repeats`` of the wall time for one pass over ``images``, per image."""
    niqe_y(images[0])  # warm-up: model load + sha256, gamma table
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for img in images:
            niqe_y(img, crop=4)
        times.append((time.perf_counter() - t0) * 1000.0 / len(images))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--datasets", type=Path, default=_default_datasets())
    args = parser.parse_args()

    set5_512 = args.datasets / "Set5" / "HR" / "img_001_SRF_4_HR.png"
    if set5_512.is_file():
        img, what = load_image(set5_512), f"{set5_512.name} (Set5)"
    else:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:512, 0:512]
        base = 120 + 50 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
        img = np.clip(base[..., None] + rng.normal(0, 12, (512, 512, 3)), 0, 255)
        img, what = img.round().astype(np.uint8), "synthetic"
    assert img.shape[:2] == (512, 512), img.shape
    print(f"niqe_y, 512x512 RGB {what}, crop 4, 1 thread: "
          f"{_median_ms([img], args.repeats):.1f} ms (median of {args.repeats})")

    set14 = args.datasets / "Set14" / "HR"
    if set14.is_dir():
        images = [load_image(p) for p in list_images(set14)]
        print(f"niqe_y, Set14 HR ({len(images)} images), crop 4, 1 thread: "
              f"{_median_ms(images, args.repeats):.1f} ms per image (median of {args.repeats})")
    else:
        print(f"{set14} not found: Set14 figure skipped (set SRGAN_SHARED_DATASETS)")


if __name__ == "__main__":
    main()
