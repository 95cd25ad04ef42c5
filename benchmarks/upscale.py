"""Inference throughput of `srgan upscale`: output megapixels per second, whole-image and tiled,
with and without channels_last, on the CPU and (when present) CUDA.

Usage: python benchmarks/upscale.py [--size 512] [--blocks 16] [--channels 64] [--tile 256]
       [--overlap N] [--repeats 1] [--device auto|cpu|cuda|all] [--threads N]

Each figure is the median wall time of `srcore.upscale.upscale_image` (the CLI's path: uint8 in,
per-tile float on the device, uint8 out) on one random size x size LR image, for the paper's
SRResNet (B=16, 64 channels, x4) with random weights: speed does not depend on the weights.
Tiled uses the CLI's default overlap (16 LR pixels), so it computes more pixels than
whole-image: a 512x512 input in 256-tiles runs 4 windows of 272x272 (1.13x the pixels).
Variants are timed round-robin so other load on the machine hits all of them alike; CUDA
figures are medians of at least 5 runs.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from srcore.models.srresnet import SRResNet  # noqa: E402
from srcore.upscale import default_overlap, upscale_image  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_device(device: torch.device, args: argparse.Namespace) -> list[tuple[str, float]]:
    """(variant, output MP/s) for whole/tiled x NCHW/channels_last on one device."""
    torch.manual_seed(0)
    base = SRResNet(blocks=args.blocks, channels=args.channels, scale=4, global_skip=True).eval()
    overlap = default_overlap(base) if args.overlap is None else args.overlap
    repeats = max(args.repeats, 5) if device.type == "cuda" else args.repeats
    lr = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    models = {"nchw": base.to(device),
              "channels_last": copy.deepcopy(base).to(device, memory_format=torch.channels_last)}
    variants = {
        f"{mode:<5} {fmt_name:<13}": (models[fmt_name], tile, fmt)
        for mode, tile in (("whole", 0), ("tiled", args.tile))
        for fmt_name, fmt in (("nchw", torch.contiguous_format),
                              ("channels_last", torch.channels_last))
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    small = lr[:64, :64]
    for model, tile, fmt in variants.values():  # warm-up: oneDNN / cuDNN kernel selection
        upscale_image(model, small, 4, min(tile, 32), overlap, device, fmt)
    _sync(device)
    for _ in range(repeats):
        for name, (model, tile, fmt) in variants.items():
            start = time.perf_counter()
            upscale_image(model, lr, 4, tile, overlap, device, fmt)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    out_mp = (4 * args.size) ** 2 / 1e6
    return [(name, out_mp / statistics.median(t)) for name, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="LR side in pixels")
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=None,
                        help="default: as srgan upscale (16, or the receptive radius if less)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs per variant on the CPU (CUDA: at least 5)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "all"), default="auto",
                        help="auto = cpu, plus cuda when present")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    names = {"auto": ["cpu"] + (["cuda"] if cuda else []), "all": ["cpu", "cuda"],
             "cpu": ["cpu"], "cuda": ["cuda"]}[args.device]
    overlap = (default_overlap(SRResNet(args.blocks, 4)) if args.overlap is None
               else args.overlap)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} CPU threads; SRResNet B={args.blocks} "
          f"C={args.channels} x4, LR {args.size}x{args.size} -> "
          f"{4 * args.size}x{4 * args.size}; tile {args.tile}, overlap {overlap}; "
          f"{args.repeats} run(s) per variant on the CPU")
    for name in names:
        device = torch.device(name)
        label = torch.cuda.get_device_name(device) if name == "cuda" else "cpu"
        with torch.no_grad():
            results = bench_device(device, args)
        for variant, mps in results:
            print(f"{label:<24} {variant}  {mps:8.3f} output MP/s")


if __name__ == "__main__":
    main()
