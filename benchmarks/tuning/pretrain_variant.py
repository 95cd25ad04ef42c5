"""One pretraining variant of the quick profile, scored on the validation split only.

Tuning reads `sample_val`, never a test set (the issue-9 log, measured on sample_test and Set5,
spent them). Run it in a workspace after `srgan download --no-dvc && srgan prepare`:

    SRGAN_PREPARED=prepared python benchmarks/tuning/pretrain_variant.py \\
        batch=8 iters=3000 sched=cos flat=8 name=E evals=1500,3000 save=E.pt

Knobs (key=value): iters, batch, crop (HR), lr, blocks, sched (const | cos | stepF: x0.1 after
fraction F), loss (mse | l1), flat (redraw crops whose HR std, 0-255, is below it: the rule
of srcore's min_crop_std, applied here after the loader), sampling, ema, nobn (BatchNorm
replaced by identity), seed, threads, evals (iterations to score at), save (state dict path).
Prints one JSON line per evaluation: validation PSNR-Y gain over bicubic in dB (mean and per
image) and validation NIQE.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from srcore.data.datasets import Pair, RandomCropBatches, load_pairs, open_train_set
from srcore.data.degrade import imresize
from srcore.metrics import niqe_y, psnr_y
from srcore.models.srresnet import SRResNet
from srcore.upscale import upscale_image

DEFAULTS: dict[str, Any] = dict(
    iters=1500, batch=16, crop=64, lr=3e-4, blocks=16, sched="const", loss="mse", flat=0.0,
    sampling="image", evals="500,1000,1500", threads=1, ema=0.0, seed=0, warm=0, name="x",
    save="", nobn=0)


def knobs(argv: list[str], defaults: dict[str, Any]) -> dict[str, Any]:
    cfg = dict(defaults)
    for arg in argv:
        key, value = arg.split("=", 1)
        if key not in cfg:
            raise SystemExit(f"unknown knob {key!r}; known: {', '.join(cfg)}")
        cfg[key] = value if isinstance(cfg[key], str) else type(cfg[key])(value)
    return cfg


def gains(net: nn.Module, tests: dict[str, list[Pair]],
          bicubic: dict[str, list[float]]) -> dict[str, tuple[float, list[float]]]:
    out = {}
    for name, pairs in tests.items():
        images = [upscale_image(net, p.lr, 4) for p in pairs]
        scores = [psnr_y(sr, p.hr) for sr, p in zip(images, pairs, strict=True)]
        out[name] = (float(np.mean(scores) - np.mean(bicubic[name])),
                     [round(a - b, 2) for a, b in zip(scores, bicubic[name], strict=True)])
        out[f"{name}_niqe"] = (float(np.mean([niqe_y(sr, 4) for sr in images])), [])
    return out


def main() -> None:
    cfg = knobs(sys.argv[1:], DEFAULTS)
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    prep = Path(os.environ.get("SRGAN_PREPARED", "prepared"))
    train = open_train_set(prep / "train", "sample_train", 4)
    tests = {"sample_val": load_pairs(prep / "val", "sample_val", 4)}
    bicubic = {s: [psnr_y(imresize(p.lr, 4.0), p.hr) for p in ps] for s, ps in tests.items()}
    data = RandomCropBatches(train, cfg["batch"], cfg["crop"], 4, cfg["seed"], True,
                             cfg["sampling"])
    model = SRResNet(cfg["blocks"], 64, 4, True)
    if cfg["nobn"]:
        for module in list(model.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.BatchNorm2d):
                    setattr(module, child_name, nn.Identity())
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), cfg["lr"], betas=(0.9, 0.999))
    ema = None
    if cfg["ema"]:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg["ema"]),
                            use_buffers=True)
    n = cfg["iters"]

    def lr_at(i: int) -> float:
        base = cfg["lr"]
        if cfg["warm"] and i < cfg["warm"]:
            return base * (i + 1) / cfg["warm"]
        if cfg["sched"] == "cos":
            return 1e-6 + 0.5 * (base - 1e-6) * (1 + math.cos(math.pi * i / n))
        if cfg["sched"].startswith("step"):
            return base * (0.1 if i >= float(cfg["sched"][4:]) * n else 1)
        return base

    evals = {int(e) for e in cfg["evals"].split(",")}
    t0, redrawn, t_train = time.perf_counter(), 0, 0.0
    for i in range(n):
        lr, hr = data[i + 1]
        if cfg["flat"]:
            std = hr.flatten(1).std(1) * 127.5
            j = i * 1000 + 10**7  # candidates from items no training iteration uses
            for b in torch.nonzero(std < cfg["flat"]).flatten().tolist():
                for _ in range(20):
                    j += 1
                    lr2, hr2 = data[j]
                    if hr2[0].std() * 127.5 >= cfg["flat"]:
                        lr[b], hr[b] = lr2[0], hr2[0]
                        break
                redrawn += 1
        t1 = time.perf_counter()
        lr = lr.contiguous(memory_format=torch.channels_last)
        hr = hr.contiguous(memory_format=torch.channels_last)
        for group in opt.param_groups:
            group["lr"] = lr_at(i)
        with torch.autocast("cpu", torch.bfloat16):
            sr = model(lr)
        sr = sr.float()
        loss = F.mse_loss(sr, hr) if cfg["loss"] == "mse" else F.l1_loss(sr, hr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        t_train += time.perf_counter() - t1
        if i + 1 in evals:
            res = gains(model, tests, bicubic)
            line = {"name": cfg["name"], "it": i + 1, "t": round(time.perf_counter() - t0),
                    "ttrain": round(t_train), "val": round(res["sample_val"][0], 3),
                    "val_niqe": round(res["sample_val_niqe"][0], 3),
                    "per": res["sample_val"][1], "rej": redrawn}
            if ema is not None:
                res = gains(ema.module, tests, bicubic)
                line.update(ema_val=round(res["sample_val"][0], 3),
                            ema_val_niqe=round(res["sample_val_niqe"][0], 3))
            print(json.dumps(line), flush=True)
    if cfg["save"]:
        torch.save((ema.module if ema is not None else model).state_dict(), cfg["save"])


if __name__ == "__main__":
    main()
