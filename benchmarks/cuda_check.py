"""The paper overlay's training steps on this machine: steps/s and peak memory, on any device.

Usage: python benchmarks/cuda_check.py [--device auto|cpu|cuda] [--iters 10] [--warmup 3]
       [--blocks B] [--channels C] [--crop N] [--batch N] [--d-channels N] [--threads N]
       [--json PATH]

Builds the steps exactly as the stages do (srcore.training.steps, srcore.training.runtime) with
params.yaml + configs/paper.yaml merged as `srgan params apply` would merge them: 16 blocks,
64 channels, no global skip, batch 16 of 96x96 HR crops, the VGG54 content loss with the
1e-3 adversarial term, autocast as runtime.precision resolves on this device, channels_last,
fused Adam. torchvision's ImageNet VGG19 is used when it is in the torch cache; otherwise the
VGG19 trunk has random weights (same shapes, same cost), and the output says so. The size
options shrink the run (the test runs it on CPU in seconds); without them it is the paper's.

Prints, per stage, steps/s, patches/s and ms per step (medians of timed steps, the device
synchronised around each) and the peak memory: CUDA's max_memory_allocated for the stage, or
on CPU the process's peak RSS so far.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout, no install

from srcore import config  # noqa: E402
from srcore.losses import ContentLoss  # noqa: E402
from srcore.models import vgg  # noqa: E402
from srcore.models.discriminator import Discriminator  # noqa: E402
from srcore.models.srresnet import build_generator  # noqa: E402
from srcore.training import runtime  # noqa: E402
from srcore.training.steps import make_finetune_step, make_pretrain_step  # noqa: E402

Step = Callable[[torch.Tensor, torch.Tensor], dict[str, float]]


def paper_params(args: argparse.Namespace) -> config.Params:
    """params.yaml + configs/paper.yaml, then the size options (when given) and the device."""
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    raw = config.deep_merge(base, yaml.safe_load((REPO / "configs" / "paper.yaml").read_text()))
    if args.blocks is not None:
        raw["model"]["blocks"] = args.blocks
    if args.channels is not None:
        raw["model"]["channels"] = args.channels
    for stage in ("pretrain", "finetune"):
        if args.batch is not None:
            raw[stage]["batch_size"] = args.batch
        if args.crop is not None:
            raw[stage]["hr_crop"] = args.crop
    if args.d_channels is not None:
        raw["finetune"]["d_channels"] = args.d_channels
    raw["runtime"]["device"] = args.device
    return config.parse(raw, "params.yaml + configs/paper.yaml")


def vgg_weights(kind: str) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The cached ImageNet VGG19, else a random trunk of the same shapes (never fetched)."""
    if kind == "mse":
        return None, "pixel MSE"
    cached = vgg.weights_path(vgg.VGG19_URL)
    if cached.is_file():
        return vgg.load_vgg19_state_dict(vgg.VGG19_URL), f"ImageNet VGG19 from {cached}"
    torch.manual_seed(0)
    trunk = vgg.vgg19_features(vgg.LAYER_END[kind])
    state = {f"features.{k}": v for k, v in trunk.state_dict().items()}
    return state, f"random VGG19 weights ({cached} is absent; same cost)"


def build_steps(params: config.Params, device: torch.device,
                vgg_state: dict[str, torch.Tensor] | None) -> dict[str, Step]:
    """Both stages' steps, built as srcore.stages.pretrain / finetune build theirs."""
    fmt = runtime.memory_format(params)
    out: dict[str, Step] = {}
    p, f = params.pretrain, params.finetune
    g = build_generator(params.model, params.scale).to(device, memory_format=fmt).train()
    out["pretrain"] = make_pretrain_step(
        runtime.maybe_compile(params, g), runtime.make_adam(g, p.lr, (p.beta1, p.beta2), device),
        params, device)
    g = build_generator(params.model, params.scale).to(device, memory_format=fmt).train()
    d = Discriminator(f.hr_crop, f.d_channels).to(device, memory_format=fmt).train()
    content = ContentLoss(f.content_loss, vgg_state).to(device, memory_format=fmt)
    out["finetune"] = make_finetune_step(
        runtime.maybe_compile(params, g), d, content,
        runtime.make_adam(g, f.lr, (f.beta1, f.beta2), device),
        runtime.make_adam(d, f.lr, (f.beta1, f.beta2), device), f, params, device)
    return out


def batch(params: config.Params, stage: str, device: torch.device) -> tuple[torch.Tensor, ...]:
    cfg = getattr(params, stage)
    gen = torch.Generator().manual_seed(1)
    b, c, s = cfg.batch_size, cfg.hr_crop, params.scale
    lr = torch.rand(b, 3, c // s, c // s, generator=gen)
    hr = torch.rand(b, 3, c, c, generator=gen) * 2 - 1
    fmt = runtime.memory_format(params)
    return lr.to(device, memory_format=fmt), hr.to(device, memory_format=fmt)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(step: Step, inputs: tuple[torch.Tensor, ...], iters: int, warmup: int,
            device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step(*inputs)
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        losses = step(*inputs)
        sync(device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"steps_per_s": 1 / median, "ms_per_step": median * 1e3,
            "peak_mib": peak_mib(device),
            "losses_finite": all(math.isfinite(v) for v in losses.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--iters", type=int, default=10, help="timed steps per stage")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per stage "
                        "(cuDNN autotuning, allocator warm-up)")
    parser.add_argument("--blocks", type=int, default=None, help="override model.blocks")
    parser.add_argument("--channels", type=int, default=None, help="override model.channels")
    parser.add_argument("--crop", type=int, default=None, help="override the HR crop side")
    parser.add_argument("--batch", type=int, default=None, help="override the batch size")
    parser.add_argument("--d-channels", type=int, default=None,
                        help="override finetune.d_channels")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    params = paper_params(args)
    device = runtime.setup_runtime(params)
    used = runtime.precision(params, device)
    vgg_state, vgg_what = vgg_weights(params.finetune.content_loss)
    steps = build_steps(params, device, vgg_state)
    what = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
                 "threads")
    m, f = params.model, params.finetune
    print(f"device {device} ({what}); torch {torch.__version__}")
    print(f"precision {used.describe()}; channels_last={params.runtime.channels_last} "
          f"compile={params.runtime.compile}")
    print(f"SRResNet B={m.blocks} C={m.channels} x{params.scale} global_skip={m.global_skip}; "
          f"D base {f.d_channels}; batch {f.batch_size} x {f.hr_crop}x{f.hr_crop} HR; "
          f"content loss {f.content_loss} ({vgg_what}); {args.iters} timed steps "
          f"(+{args.warmup} warm-up)")
    print(f"{'stage':9s} {'steps/s':>8s} {'patches/s':>10s} {'ms/step':>9s} {'peak MiB':>9s}")
    results: dict[str, Any] = {"device": str(device), "device_name": what,
                               "precision": used.describe(), "vgg": vgg_what}
    for stage in ("pretrain", "finetune"):
        cfg = getattr(params, stage)
        r = measure(steps[stage], batch(params, stage, device), args.iters, args.warmup, device)
        r["patches_per_s"] = r["steps_per_s"] * cfg.batch_size
        results[stage] = r
        print(f"{stage:9s} {r['steps_per_s']:8.2f} {r['patches_per_s']:10.1f} "
              f"{r['ms_per_step']:9.1f} {r['peak_mib']:9.0f}")
    if device.type != "cuda":
        print("(peak MiB on CPU: the process's peak RSS so far)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
