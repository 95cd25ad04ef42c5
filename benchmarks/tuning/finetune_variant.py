"""One fine-tuning variant: srcore's SRGAN step from a saved state dict, scored as
pretrain_variant.py scores (same workspace and SRGAN_PREPARED):

    python benchmarks/tuning/finetune_variant.py init=E.pt lr=1e-5 lr2=1e-6 name=H

Knobs: init, iters, lr (first half), lr2 (second half), adv (adversarial weight), blocks, crop,
batch, ema, threads, evals. The other finetune settings come from the checked-in params.yaml.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from pretrain_variant import gains, knobs  # this folder is on sys.path when run as a script

from srcore import config
from srcore.data.datasets import RandomCropBatches, load_pairs
from srcore.data.degrade import imresize
from srcore.losses import ContentLoss
from srcore.metrics import psnr_y
from srcore.models.discriminator import Discriminator
from srcore.models.srresnet import SRResNet
from srcore.training.runtime import make_adam
from srcore.training.steps import make_finetune_step

DEFAULTS: dict[str, Any] = dict(init="", iters=200, lr=1e-4, lr2=1e-5, adv=1e-3, blocks=16,
                                crop=64, batch=16, ema=0.0, threads=1, name="ft",
                                evals="100,200")


def main() -> None:
    cfg = knobs(sys.argv[1:], DEFAULTS)
    raw = config.load(Path(__file__).resolve().parents[2] / "params.yaml").model_dump()
    raw["finetune"].update(iterations=cfg["iters"], lr=cfg["lr"], lr_second_half=cfg["lr2"],
                           adv_weight=cfg["adv"], hr_crop=cfg["crop"],
                           batch_size=cfg["batch"])
    params = config.parse(raw)
    fc = params.finetune
    torch.set_num_threads(cfg["threads"])
    device = torch.device("cpu")
    prep = Path(os.environ.get("SRGAN_PREPARED", "prepared"))
    train = load_pairs(prep, "sample_train", 4)
    tests = {s: load_pairs(prep, s, 4) for s in ("sample_test", "set5")}
    bicubic = {s: [psnr_y(imresize(p.lr, 4.0), p.hr) for p in ps] for s, ps in tests.items()}
    g = SRResNet(cfg["blocks"], 64, 4, True)
    g.load_state_dict(torch.load(cfg["init"], weights_only=True))
    g = g.to(memory_format=torch.channels_last)
    print(json.dumps({"name": cfg["name"], "it": 0, **gains(g, tests, bicubic)}), flush=True)
    d = Discriminator(fc.hr_crop, 64).to(memory_format=torch.channels_last)
    opt_g = make_adam(g, fc.lr, (0.9, 0.999), device)
    opt_d = make_adam(d, fc.lr, (0.9, 0.999), device)
    ema = None
    if cfg["ema"]:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(g, multi_avg_fn=get_ema_multi_avg_fn(cfg["ema"]), use_buffers=True)
    step = make_finetune_step(g, d, ContentLoss("mse"), opt_g, opt_d, fc, params, device)
    data = RandomCropBatches(train, fc.batch_size, fc.hr_crop, 4, 1, True, "image")
    g.train()
    d.train()
    evals = {int(e) for e in cfg["evals"].split(",")}
    t0 = time.perf_counter()
    for i in range(fc.iterations):
        lr_now = fc.lr if i < fc.iterations // 2 else fc.lr_second_half
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = lr_now
        lr, hr = data[i + 1]
        out = step(lr.contiguous(memory_format=torch.channels_last),
                   hr.contiguous(memory_format=torch.channels_last))
        if ema is not None:
            ema.update_parameters(g)
        if i + 1 in evals:
            line = {"name": cfg["name"], "it": i + 1, "t": round(time.perf_counter() - t0),
                    **gains(g, tests, bicubic), "d_real": round(out["d_real_mean"], 3),
                    "d_fake": round(out["d_fake_mean"], 3)}
            if ema is not None:
                line["ema"] = gains(ema.module, tests, bicubic)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
