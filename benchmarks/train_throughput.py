"""Training throughput: this project's pretrain and finetune steps against a plain eager step.

Usage: python benchmarks/train_throughput.py [--blocks 16] [--channels 64] [--batch 4]
       [--crop 96] [--iters 4] [--warmup 1] [--device auto|cpu|cuda] [--threads N]
       [--params params.yaml] [--cpu-bf16]

"project" is the step the stages run (srcore.training.steps: make_pretrain_step, ..._finetune_step)
with the runtime settings of params.yaml: channels_last, runtime.precision, fused Adam,
torch.compile when runtime.compile is on; SRResNet's tail as NarrowOutputConv2d (computed as
a transposed convolution on CPU); for finetune, D's weights frozen during G's backward.
"plain" is the textbook eager step of the same weights: nn.Conv2d tail, NCHW, fp32, default
Adam, DCGAN-style finetune (one G forward; D's weight gradients computed during G's backward
and thrown away). Content loss is pixel MSE so no VGG weights are needed.

Steps are timed alternately (plain, project, project, plain, ...) so that other load on the
machine hits both variants alike; the figures are medians. GFLOP/s counts the convolution and
matmul FLOPs of one step (torch.utils.flop_counter, forward + backward) per patch; for the
paper's SRResNet (B=16, 64 ch, 96x96 HR) that is ~7.6 GFLOP per patch per pretrain step.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from srcore import config  # noqa: E402
from srcore.losses import ContentLoss, discriminator_loss, generator_adversarial_loss  # noqa: E402
from srcore.models.discriminator import Discriminator  # noqa: E402
from srcore.models.srresnet import NarrowOutputConv2d, build_generator  # noqa: E402
from srcore.training import runtime  # noqa: E402
from srcore.training.steps import make_finetune_step, make_pretrain_step  # noqa: E402

Step = Callable[[torch.Tensor, torch.Tensor], Any]
PAPER_GFLOP_PER_PATCH = 7.5  # SRResNet B=16, 64 ch, 96x96 HR, forward + backward


def bench_params(args: argparse.Namespace) -> config.Params:
    """params.yaml with the benchmark's model size, batch and device; runtime as checked in."""
    raw = yaml.safe_load(Path(args.params).read_text())
    raw["model"].update(blocks=args.blocks, channels=args.channels)
    for stage in ("pretrain", "finetune"):
        raw[stage].update(batch_size=args.batch, hr_crop=args.crop)
    raw["finetune"].update(content_loss="mse", d_channels=64)
    raw["runtime"].update(device=args.device)
    return config.parse(raw, args.params)


# ------------------------------------------------------------------------- the two variants


def project_steps(params: config.Params, g0: nn.Module, d0: nn.Module, device: torch.device,
                  amp: runtime.AmpContext | None = None) -> dict[str, Step]:
    """The stages' own steps, built the way srcore.stages.pretrain/finetune build them."""
    fmt = runtime.memory_format(params)
    out: dict[str, Step] = {}
    g = copy.deepcopy(g0).to(device, memory_format=fmt).train()
    p = params.pretrain
    out["pretrain"] = make_pretrain_step(
        runtime.maybe_compile(params, g), runtime.make_adam(g, p.lr, (p.beta1, p.beta2), device),
        params, device, amp)
    f = params.finetune
    g = copy.deepcopy(g0).to(device, memory_format=fmt).train()
    d = copy.deepcopy(d0).to(device, memory_format=fmt).train()
    content = ContentLoss(f.content_loss).to(device)
    out["finetune"] = make_finetune_step(
        runtime.maybe_compile(params, g), d, content,
        runtime.make_adam(g, f.lr, (f.beta1, f.beta2), device),
        runtime.make_adam(d, f.lr, (f.beta1, f.beta2), device), f, params, device, amp)
    return out


def textbook(g0: nn.Module) -> nn.Module:
    """A copy of G with the tail as a plain nn.Conv2d (same weights, same function)."""
    g = copy.deepcopy(g0)
    for name, module in list(g.named_modules()):
        if isinstance(module, NarrowOutputConv2d):
            plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size,
                              padding=module.padding)
            plain.load_state_dict(module.state_dict())
            parent = g.get_submodule(name.rpartition(".")[0]) if "." in name else g
            setattr(parent, name.rpartition(".")[2], plain)
    return g


def plain_steps(params: config.Params, g0: nn.Module, d0: nn.Module,
                device: torch.device) -> dict[str, Step]:
    """Textbook eager NCHW fp32 steps of the same networks and hyper-parameters."""
    p, f = params.pretrain, params.finetune
    g = textbook(g0).to(device).train()
    opt = torch.optim.Adam(g.parameters(), lr=p.lr, betas=(p.beta1, p.beta2))

    def pretrain(lr: torch.Tensor, hr: torch.Tensor) -> float:
        loss = F.mse_loss(g(lr), hr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    gf = textbook(g0).to(device).train()
    d = copy.deepcopy(d0).to(device).train()
    opt_g = torch.optim.Adam(gf.parameters(), lr=f.lr, betas=(f.beta1, f.beta2))
    opt_d = torch.optim.Adam(d.parameters(), lr=f.lr, betas=(f.beta1, f.beta2))

    def finetune(lr: torch.Tensor, hr: torch.Tensor) -> float:
        sr = gf(lr)
        loss_real, loss_fake = discriminator_loss(d(hr), d(sr.detach()))
        opt_d.zero_grad()
        (loss_real + loss_fake).backward()
        opt_d.step()
        loss_g = F.mse_loss(sr, hr) + f.adv_weight * generator_adversarial_loss(d(sr))
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        return loss_g.item()

    return {"pretrain": pretrain, "finetune": finetune}


# ------------------------------------------------------------------------------- timing


def batch(params: config.Params, device: torch.device, fmt: torch.memory_format,
          seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    b, c, s = params.pretrain.batch_size, params.pretrain.hr_crop, params.scale
    lr = torch.rand(b, 3, c // s, c // s, generator=gen)
    hr = torch.rand(b, 3, c, c, generator=gen) * 2 - 1
    return lr.to(device, memory_format=fmt), hr.to(device, memory_format=fmt)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_alternately(steps: dict[str, Step], inputs: dict[str, tuple[torch.Tensor, ...]],
                     iters: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n](*inputs[n])
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(iters):
        for n in (names if i % 2 == 0 else names[::-1]):
            sync(device)
            t0 = time.perf_counter()
            steps[n](*inputs[n])
            sync(device)
            times[n].append(time.perf_counter() - t0)
    return times


def flops_per_patch(step: Step, lr: torch.Tensor, hr: torch.Tensor) -> float:
    """Conv/matmul FLOPs of one plain step (forward + backward) divided by the batch size."""
    counter = FlopCounterMode(display=False)
    with counter:
        step(lr, hr)
    return counter.get_total_flops() / lr.shape[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=96, help="HR patch side (default 96)")
    parser.add_argument("--iters", type=int, default=4, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--params", default=str(Path(__file__).resolve().parents[1]
                                                / "params.yaml"))
    parser.add_argument("--stages", default="pretrain,finetune")
    parser.add_argument("--cpu-bf16", action="store_true",
                        help="also time the project step with bf16 autocast forced on CPU")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    params = bench_params(args)
    device = runtime.resolve_device(params.runtime.device)
    rt = params.runtime
    if device.type == "cuda" and not rt.deterministic:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    g0 = build_generator(params.model, params.scale)
    d0 = Discriminator(params.finetune.hr_crop, params.finetune.d_channels)
    variants = {"plain": plain_steps(params, g0, d0, device),
                "project": project_steps(params, g0, d0, device)}
    if args.cpu_bf16 and device.type == "cpu":
        variants["project+cpu-bf16"] = project_steps(
            params, g0, d0, device, amp=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    fmts = {"plain": torch.contiguous_format}
    fmts.update({k: runtime.memory_format(params) for k in variants if k != "plain"})

    what = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()}, "
                 f"{torch.get_num_threads()} threads, {os.cpu_count()} cores")
    print(f"device {device} ({what}); torch {torch.__version__}")
    print(f"model SRResNet B={params.model.blocks} C={params.model.channels} x{params.scale}, "
          f"D base 64; batch {args.batch} x {args.crop}x{args.crop} HR; {args.iters} timed "
          f"steps (+{args.warmup} warm-up) per variant, alternating")
    print(f"project runtime (params.yaml): channels_last={rt.channels_last} precision="
          f"{runtime.precision(params, device).describe()} compile={rt.compile} fused_adam=True")
    print(f"{'stage':9s} {'variant':17s} {'patch/s':>8s} {'ms/step':>9s} {'GFLOP/patch':>11s} "
          f"{'GFLOP/s':>8s} {'vs plain':>8s}")
    for stage in args.stages.split(","):
        steps = {k: v[stage] for k, v in variants.items()}
        inputs = {k: batch(params, device, fmts[k], seed=1) for k in steps}
        one = tuple(t[:1] for t in batch(params, device, torch.contiguous_format, seed=2))
        flop_step = plain_steps(params, g0, d0, device)[stage]
        gflop = flops_per_patch(flop_step, *one) / 1e9
        times = time_alternately(steps, inputs, args.iters, args.warmup, device)
        base = statistics.median(times["plain"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rate = args.batch / med
            print(f"{stage:9s} {name:17s} {rate:8.2f} {med * 1e3:9.1f} {gflop:11.2f} "
                  f"{gflop * rate:8.1f} {base / med:7.2f}x")
    if params.model.blocks == 16 and params.model.channels == 64 and args.crop == 96:
        print(f"(reference: ~{PAPER_GFLOP_PER_PATCH} GFLOP per 96x96 patch per pretrain step "
              "for the paper's SRResNet)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
