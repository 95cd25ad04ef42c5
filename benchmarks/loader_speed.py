"""Training-loader throughput beside the pretrain step it feeds (issue: loader >= 5x the step).

Builds the embedded sample set in a temp dir (download + prepare code paths), then measures
batches/s of the crop loader (main process and with workers) and the seconds of one SRResNet
pretrain step on the same batch size, in one run:

    python benchmarks/loader_speed.py [--batch 16] [--hr-crop 96] [--steps 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from srcore import config
from srcore.config import DatasetSpec
from srcore.data.datasets import RandomCropBatches, open_train_set
from srcore.data.sources import materialize
from srcore.models.srresnet import SRResNet
from srcore.stages.prepare import prepare

REPO = Path(__file__).resolve().parents[1]


def loader_rate(dataset: RandomCropBatches, workers: int, batches: int) -> float:
    loader = DataLoader(dataset, batch_size=None, sampler=range(batches + workers * 2),
                        num_workers=workers, persistent_workers=workers > 0)
    it = iter(loader)
    for _ in range(workers * 2):  # let workers start before timing
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches / (time.perf_counter() - start)


def step_seconds(batch: int, hr_crop: int, steps: int) -> float:
    model = SRResNet(16, 64, 4, global_skip=True).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    lr = torch.rand(batch, 3, hr_crop // 4, hr_crop // 4).to(memory_format=torch.channels_last)
    hr = torch.rand(batch, 3, hr_crop, hr_crop).to(memory_format=torch.channels_last)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(lr), hr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hr-crop", type=int, default=96)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    params = config.load(REPO / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        materialize(DatasetSpec(name="sample_train"), root / "data", retries=0, timeout=1,
                    log=lambda _: None)
        sub = params.model_copy(update={"data": params.data.model_copy(
            update={"train": [DatasetSpec(name="sample_train")], "test": []})})
        prepare(sub, root / "data", root / "prepared")
        start = time.perf_counter()
        shards = open_train_set(root / "prepared" / "train", "sample_train", 4)
        opened = time.perf_counter() - start
        dataset = RandomCropBatches(shards, args.batch, args.hr_crop, 4, 0, augment=True)
        print(f"open {len(shards)} training images (manifest check + index; crops are read "
              f"from the shards): {opened:.2f} s (once per stage)")
        rates = {w: loader_rate(dataset, w, args.batches) for w in (0, 2)}
    step = step_seconds(args.batch, args.hr_crop, args.steps)
    for workers, rate in rates.items():
        print(f"loader, {workers} worker(s): {rate:8.1f} batches/s of {args.batch}x"
              f"{args.hr_crop}^2 HR crops")
    print(f"pretrain step (SRResNet B16/64ch, batch {args.batch}): {step:.3f} s "
          f"= {1 / step:.2f} steps/s on {torch.get_num_threads()} threads")
    print(f"loader / step ratio (main process): {rates[0] * step:.0f}x (goal: >= 5x)")


if __name__ == "__main__":
    main()
