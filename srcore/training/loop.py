"""The loop both training stages share: resume, batches, progress, logging, validation and
checkpoints around a stage's step function.

Resume is exact: a batch is a pure function of (seed, iteration) and a checkpoint holds every
piece of state that changes during training (weights, BN statistics, optimisers, schedulers,
EMA, RNG, the running log averages), so a killed and resumed run ends with the same weights,
bit for bit, as an uninterrupted one on the same machine and settings.

Under torchrun (runtime.distributed, srcore/training/distributed.py) the same loop runs in
every process on its slice of each global batch; rank 0 alone validates, logs and checkpoints.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from srcore.config import FinetuneConfig, Params, PretrainConfig
from srcore.data.datasets import Concat, CropSource, Pair, RandomCropBatches, open_train_set
from srcore.layout import Layout
from srcore.models.srresnet import SRResNet
from srcore.training import distributed, guard
from srcore.training.checkpoints import (
    atomic_save,
    fingerprint,
    read_checkpoint,
    restore,
    snapshot,
)
from srcore.training.runtime import memory_format, precision, unwrap
from srcore.training.steps import StepFn
from srcore.training.validation import validate, validation_pairs


class LoopTracker(Protocol):
    """What the loop logs through: tracking.Tracker, or distributed.NullTracker off rank 0."""

    run_id: str

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_image(self, image: np.ndarray, name: str) -> None: ...


@dataclass
class LoopState:
    """What the shared loop checkpoints: modules, optimisers, schedulers, EMA, log sums."""

    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any] = field(default_factory=dict)
    ema: torch.optim.swa_utils.AveragedModel | None = None
    log_sums: dict[str, float] = field(default_factory=dict)
    log_count: int = 0


def make_ema(decay: float | None, model: nn.Module) -> torch.optim.swa_utils.AveragedModel | None:
    """EMA of G's weights and BN statistics (beyond the paper: `<stage>.ema_decay`); None when
    the decay is null. Fine-tuning against a discriminator that starts from scratch moves G
    around more than the trend it follows; the average keeps the trend."""
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def final_generator(state: LoopState, generator: nn.Module) -> SRResNet:
    """The weights to save (EMA when on), with plain BatchNorm layers again."""
    net = unwrap(state.ema.module) if state.ema is not None else unwrap(generator)
    return distributed.plain_batchnorm(net)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- batches


def train_images(params: Params, layout: Layout) -> CropSource:
    """The training sets, read crop by crop from their shards (nothing decoded up front).
    Both training stages checked them with verify_prepared before the loop started."""
    return Concat([open_train_set(layout.prepared_split("train"), spec.name, params.scale,
                                  verified=True)
                   for spec in params.data.train], params.scale)


def batches(params: Params, cfg: PretrainConfig | FinetuneConfig,
            images: CropSource | list[Pair], start: int,
            device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of iterations start+1 .. cfg.iterations (item i is iteration i+1's batch);
    under a process group, this process's slice of each global batch."""
    world = distributed.current()
    dataset = RandomCropBatches(images, cfg.batch_size, cfg.hr_crop, params.scale,
                                params.seed, cfg.augment, cfg.sampling,
                                part=(world.rank, world.size), min_std=cfg.min_crop_std)
    workers = params.runtime.num_workers
    loader = DataLoader(
        dataset, batch_size=None, sampler=range(start, cfg.iterations),
        num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
    )
    fmt = memory_format(params)
    for lr, hr in loader:
        yield (lr.to(device, non_blocking=True, memory_format=fmt),
               hr.to(device, non_blocking=True, memory_format=fmt))


# ---------------------------------------------------------------------------- the loop


def run_loop(stage: str, params: Params, layout: Layout, tracker: LoopTracker,
             cfg: PretrainConfig | FinetuneConfig, state: LoopState, generator: nn.Module,
             step_fn: StepFn, device: torch.device,
             init_digest: str | None = None) -> dict[str, float]:
    """Shared loop: resume, progress bar, logging, validation, checkpoints.

    Distributed, every process runs it; rank 0 alone reads the checkpoint (and broadcasts
    it), validates and writes checkpoints, and the losses are averaged over processes.
    """
    main = distributed.current().is_main
    ckpt_path = layout.checkpoint(stage)
    fp = fingerprint(params, stage, layout.prepared)
    used = precision(params, device).name
    start = _resume(stage, state, ckpt_path, fp, init_digest, used, tracker)
    val = validation_pairs(params, layout) if main else []
    images = train_images(params, layout)
    last: dict[str, float] = {}
    first_opt = next(iter(state.optimizers.values()))
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.iterations, initial=start, desc=stage, unit="it", dynamic_ncols=True,
               disable=not main)
    it = start
    for it, (lr, hr) in enumerate(batches(params, cfg, images, start, device), start=start + 1):
        losses = distributed.average(step_fn(lr, hr))
        guard.check_values(stage, it, losses, params)  # before the sums: a NaN is never logged
        for k, v in losses.items():
            state.log_sums[k] = state.log_sums.get(k, 0.0) + v
        state.log_count += 1
        lr_used = first_opt.param_groups[0]["lr"]  # before the scheduler moves it on
        if state.ema is not None:
            state.ema.update_parameters(unwrap(generator))
        for s in state.schedulers.values():
            s.step()
        bar.update(1)
        log_now = it % cfg.log_every == 0 or it == cfg.iterations
        val_now = it % cfg.val_every == 0 or it == cfg.iterations
        checkpoint_now = it % cfg.checkpoint_every == 0 and it < cfg.iterations
        if log_now or val_now or checkpoint_now:  # every process: the weights are the same
            guard.check_weights(stage, it, _weights(state), params)
        if log_now:
            last = _log_averages(stage, state, bar, tracker, it, lr_used, device)
        if main and val_now:
            net = state.ema.module if state.ema is not None else generator
            last.update(_validate_and_log(stage, net, val, params, device, tracker, it))
        if main and checkpoint_now:
            atomic_save(snapshot(state, it, fp, tracker.run_id, init_digest, used), ckpt_path)
    bar.close()
    seconds = time.perf_counter() - t0
    done = it - start
    last.update({
        "iterations": float(cfg.iterations),
        "seconds": seconds,
        "patches_per_s": done * cfg.batch_size / seconds if seconds > 0 else 0.0,
    })
    return last


def _weights(state: LoopState) -> dict[str, nn.Module]:
    """Everything training changes that the saved model or a checkpoint would keep."""
    modules = {k: unwrap(m) for k, m in state.modules.items()}
    if state.ema is not None:
        modules["ema"] = state.ema
    return modules


def _resume(stage: str, state: LoopState, ckpt_path: Path, fp: str, init_digest: str | None,
            precision_used: str, tracker: LoopTracker) -> int:
    """The iteration to start after: rank 0's checkpoint restored on every process, else 0.

    The checkpoint dict dies on return: its optimiser state would otherwise live as long as
    the loop.
    """
    main = distributed.current().is_main
    ckpt = distributed.broadcast(
        read_checkpoint(ckpt_path, fp, init_digest, precision_used) if main else None)
    if ckpt is None:
        return 0
    restore(state, ckpt, ckpt_path)
    start = int(ckpt["iteration"])
    if main:
        tqdm.write(f"{stage}: resuming from {ckpt_path} at iteration {start}", file=sys.stderr)
    tracker.log_metrics({f"{stage}/resumed_at": start}, step=start)
    return start


def _log_averages(stage: str, state: LoopState, bar: Any, tracker: LoopTracker, it: int,
                  lr_used: float, device: torch.device) -> dict[str, float]:
    """Log the losses averaged since the last log (and the lr), then start a new average."""
    last = {k: v / state.log_count for k, v in state.log_sums.items()}
    bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if "loss" in k})
    logged = {f"{stage}/{k}": v for k, v in last.items()}
    logged[f"{stage}/lr"] = lr_used
    if device.type == "cuda":
        logged["cuda_max_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    tracker.log_metrics(logged, step=it)
    state.log_sums, state.log_count = {}, 0
    return last


def _validate_and_log(stage: str, net: nn.Module, val: list[Pair], params: Params,
                      device: torch.device, tracker: LoopTracker, it: int) -> dict[str, float]:
    """Validation PSNR-Y and NIQE (as val_psnr_y, val_niqe) and the SR images, logged at
    iteration `it` (rank 0 only)."""
    scores, images = validate(net, val, params, device)
    named = {f"val_{k}": v for k, v in scores.items()}
    guard.check_values(stage, it, named, params)
    tracker.log_metrics({f"{stage}/{k}": v for k, v in named.items()}, step=it)
    for p, img in zip(val, images, strict=True):
        tracker.log_image(img, f"val/{stage}/{it:07d}_{p.name}.png")
    return named
