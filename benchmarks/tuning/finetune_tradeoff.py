"""One fine-tuning variant of the quick profile, scored on the validation split only (issue 14).

Runs exactly the finetune stage's recipe (srcore.stages.finetune.train) from the workspace's
models/srresnet.pt with params.yaml plus `key=value` overrides, in a folder of its own (so
variants can run side by side), and prints one JSON line per validation point: validation
PSNR-Y and NIQE of every data.val set, whole images, fp32 inference, as `srgan evaluate`
scores them; the first line is the starting SRResNet, the last adds the bicubic baseline and
the alpha blends (0.25, 0.5, 0.75) of the final SRGAN with its SRResNet.

Test sets are never read. Workspace: a project folder after `srgan download --no-dvc`,
`srgan prepare` and `srgan pretrain`:

    python benchmarks/tuning/finetune_tradeoff.py WORKSPACE name=ema1000 threads=2 \\
        finetune.iterations=1000 finetune.ema_decay=0.99 finetune.val_every=200

(The README's log was measured at commit 13117d4, where the EMA key was runtime.ema_decay.)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from srcore import config
from srcore.data.datasets import load_pairs
from srcore.evaluate import bicubic_upscale
from srcore.layout import Layout
from srcore.metrics import niqe_y, psnr_y
from srcore.models.interpolate import blend
from srcore.stages import finetune
from srcore.training.checkpoints import load_generator_file
from srcore.upscale import upscale_image


class PrintTracker:
    """The loop's tracker, printing validation points instead of logging to MLflow."""

    run_id = "tuning"

    def __init__(self, name: str) -> None:
        self.name, self.t0 = name, time.perf_counter()

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        val = {k.split("/", 1)[1]: round(v, 4) for k, v in metrics.items() if "/val_" in k}
        if val:
            print(json.dumps({"name": self.name, "it": step,
                              "t": round(time.perf_counter() - self.t0), **val}), flush=True)

    def log_image(self, image: np.ndarray, name: str) -> None:
        pass


def score(net: torch.nn.Module | None, pairs: list[Any], crop: int) -> dict[str, float]:
    """Mean PSNR-Y and NIQE of whole validation images (net None: bicubic)."""
    psnrs, niqes = [], []
    with torch.inference_mode():
        for p in pairs:
            sr = bicubic_upscale(p.lr, 4) if net is None else upscale_image(net.eval(), p.lr, 4)
            psnrs.append(psnr_y(sr, p.hr, crop))
            niqes.append(niqe_y(sr, crop))
    return {"psnr_y": round(float(np.mean(psnrs)), 3), "niqe": round(float(np.mean(niqes)), 3)}


def main() -> None:
    root = Path(sys.argv[1]).resolve()
    knobs = dict(arg.split("=", 1) for arg in sys.argv[2:])
    name = knobs.pop("name", "variant")
    torch.set_num_threads(int(knobs.pop("threads", "1")))
    raw = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in knobs.items():
        *sections, leaf = key.split(".")
        node = raw
        for section in sections:
            node = node[section]
        node[leaf] = yaml.safe_load(value)
    params = config.parse(raw, "params.yaml + overrides")
    # A folder per variant: its own checkpoints; prepared/ and models/srresnet.pt are shared.
    own = root / "variants" / name
    (own / "models").mkdir(parents=True, exist_ok=True)
    for link, target in ((own / "prepared", root / "prepared"),
                         (own / "models" / "srresnet.pt", root / "models" / "srresnet.pt")):
        if not link.exists():
            os.symlink(target, link)
    layout = Layout(own)
    crop = params.evaluate.crop_border
    val = [p for spec in params.data.val for p in load_pairs(layout.prepared, spec.name, 4)]
    srresnet = load_generator_file(layout.model("srresnet"))
    print(json.dumps({"name": name, "it": 0, **score(srresnet, val, crop)}), flush=True)
    model, _ = finetune.train(params, layout, PrintTracker(name))
    final = {"name": name, "it": params.finetune.iterations, "final": score(model, val, crop),
             "bicubic": score(None, val, crop),
             **{f"alpha_{a}": score(blend(srresnet, model, a), val, crop)
                for a in (0.25, 0.5, 0.75)}}
    print(json.dumps(final), flush=True)
    torch.save(model.state_dict(), own / "srgan_state.pt")


if __name__ == "__main__":
    main()
