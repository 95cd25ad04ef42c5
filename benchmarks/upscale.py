"""Inference speed of `srgan upscale` at its default precision beside a plain eager fp32 forward
of the same network, in one run on the same images; and (--memory) the peak memory of
`srgan upscale --alpha` on a large image.

Usage: python benchmarks/upscale.py [--size 256] [--images FOLDER] [--blocks 16] [--channels 64]
       [--repeats 3] [--threads N] [--device auto|cpu|cuda]
       python benchmarks/upscale.py --memory 4000x3000 [--alpha 0.5] [--blocks 16 ...]

Speed: each variant upscales the same LR images (random size x size, or every image in
--images, e.g. Set14's LR_bicubic_X4), variants timed round-robin so other load on the machine
hits all of them alike; the figure is LR pixels per second over the median of --repeats runs.

* `plain fp32 NCHW`: `model(x)` on the whole image, eager, fp32, contiguous: the baseline.
* `fp32 channels_last`, `bf16 NCHW`: one change each, to show where the speed comes from.
* `srgan upscale default`: what the CLI and `srgan serve` run, `srcore.upscale.upscale_image`
  with the default tile (256), overlap, channels_last and precision `auto` (bf16 where the
  hardware runs it natively, with `for_inference`'s BatchNorm folding), uint8 in and out.

The paper's SRResNet (B=16, 64 channels, x4, global skip) with random weights: speed does not
depend on the weights. Memory (--memory WxH): `srgan upscale --alpha A` in a child process on
a smooth WxH image with a random SRResNet/SRGAN pair of that size, reporting the child's peak
RSS (VmHWM), its baseline after a warm-up run, and the bound srcore.upscale states.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from srcore.data.images import list_images, load_image  # noqa: E402
from srcore.models.srresnet import SRResNet  # noqa: E402
from srcore.precision import resolve  # noqa: E402
from srcore.serving import DEFAULT_TILE  # noqa: E402
from srcore.upscale import (  # noqa: E402
    default_overlap,
    for_inference,
    image_bytes,
    lr_to_tensor,
    tile_bytes,
    upscale_image,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images(args: argparse.Namespace) -> list[np.ndarray]:
    if args.images:
        return [load_image(p) for p in list_images(Path(args.images))]
    return [np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), np.uint8)]


def variants(base: SRResNet, device: torch.device) -> dict[str, Callable[[np.ndarray], object]]:
    """name -> one upscale of an LR uint8 image."""
    nchw = copy.deepcopy(base).to(device)
    cl = copy.deepcopy(base).to(device, memory_format=torch.channels_last)
    bf16 = resolve("bf16", device)
    auto = resolve("auto", device)
    overlap = default_overlap(base)

    def plain(lr: np.ndarray) -> object:
        return nchw(lr_to_tensor(lr, device))

    def channels_last(lr: np.ndarray) -> object:
        return cl(lr_to_tensor(lr, device, torch.channels_last))

    def bf16_nchw(lr: np.ndarray) -> object:
        with bf16.autocast(device):
            return nchw(lr_to_tensor(lr, device))

    ready = for_inference(cl, auto, torch.channels_last)

    def default(lr: np.ndarray) -> object:
        return upscale_image(ready, lr, 4, DEFAULT_TILE, overlap, device, torch.channels_last,
                             precision=auto)

    return {"plain fp32 NCHW": plain, "fp32 channels_last": channels_last,
            "bf16 NCHW": bf16_nchw, f"srgan upscale default ({auto.name})": default}


@torch.no_grad()
def bench_speed(device: torch.device, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    base = SRResNet(args.blocks, args.channels, 4, global_skip=True).eval()
    images = _images(args)
    pixels = sum(im.shape[0] * im.shape[1] for im in images)
    runs = variants(base, device)
    for run in runs.values():  # warm-up: oneDNN / cuDNN kernel selection
        run(images[0][:64, :64])
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            for im in images:
                run(im)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    baseline = statistics.median(times["plain fp32 NCHW"])
    print(f"{label}: {resolve('auto', device).describe()}")
    for name, t in times.items():
        median = statistics.median(t)
        print(f"  {name:<32} {pixels / median / 1e3:9.1f} thousand LR pixels/s  "
              f"x{baseline / median:.2f}  (median {median:.2f} s of {len(t)})")


CHILD = """
import json, sys
from srcore import cli
from srcore.server import peak_rss_bytes
args = sys.argv[1:]
assert cli.main(["upscale", args[1], "-o", args[2] + "-warm", *args[3:]]) == 0
baseline = peak_rss_bytes()
code = cli.main(["upscale", args[0], "-o", args[2], *args[3:]])
print(json.dumps({"code": code, "baseline": baseline, "peak": peak_rss_bytes()}))
"""


def bench_memory(args: argparse.Namespace) -> None:
    w, h = (int(v) for v in args.memory.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="srgan-mem-") as tmp:
        folder = Path(tmp)
        from PIL import Image

        from srcore.training.checkpoints import save_generator

        torch.manual_seed(0)
        pair = [SRResNet(args.blocks, args.channels, 4, global_skip=True).eval()
                for _ in range(2)]
        save_generator(pair[0], folder / "srresnet.pt", {})
        save_generator(pair[1], folder / "srgan.pt", {})
        yy, xx = np.mgrid[0:h, 0:w]
        big = np.stack([(np.sin(xx / (40 + 9 * c)) * np.cos(yy / 33) + 1) * 127.5
                        for c in range(3)], -1).astype(np.uint8)
        Image.fromarray(big).save(folder / "big.png")
        Image.fromarray(big[:64, :64]).save(folder / "small.png")
        del big, yy, xx
        start = time.perf_counter()
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(folder / "big.png"), str(folder / "small.png"),
             str(folder / "out"), "--model", str(folder / "srgan.pt"), "--alpha",
             str(args.alpha)], capture_output=True, text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        seconds = time.perf_counter() - start
        if child.returncode:
            sys.exit(child.stderr)
        result = json.loads(child.stdout.strip().splitlines()[-1])
        bound = (tile_bytes(pair[1], DEFAULT_TILE, default_overlap(pair[1]))
                 + image_bytes(w * h, 4, encoded_in_memory=False))
        said = [ln for ln in child.stderr.splitlines() if ln.startswith("upscale: ")]
        print(f"srgan upscale --alpha {args.alpha} on {w}x{h} (B={args.blocks} "
              f"C={args.channels}, {said[-1] if said else ''}): exit {result['code']}, "
              f"{seconds:.0f} s; peak RSS {result['peak'] / 2**30:.2f} GiB, "
              f"{(result['peak'] - result['baseline']) / 2**30:.2f} GiB over the warm "
              f"baseline of {result['baseline'] / 2**30:.2f} GiB; stated bound over the "
              f"baseline {bound / 2**30:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="random LR side in pixels")
    parser.add_argument("--images", default=None, help="folder of LR images instead")
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = cpu, plus cuda when present")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory", default=None, metavar="WxH",
                        help="measure the peak memory of srgan upscale --alpha on a WxH image")
    parser.add_argument("--alpha", type=float, default=0.5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} CPU threads; SRResNet B={args.blocks} "
          f"C={args.channels} x4")
    if args.memory:
        bench_memory(args)
        return
    names = {"auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []),
             "cpu": ["cpu"], "cuda": ["cuda"]}[args.device]
    for name in names:
        bench_speed(torch.device(name), args)


if __name__ == "__main__":
    main()
