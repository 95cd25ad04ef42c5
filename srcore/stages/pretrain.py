"""`srgan pretrain`: SRResNet trained with pixel MSE, the generator SRGAN starts from.

Writes models/srresnet.pt and metrics/pretrain.json, logs the run to MLflow and registers
'srresnet'. Checkpoints to checkpoints/pretrain.pt and resumes from it after an interruption,
exactly: the resumed run ends with the weights an uninterrupted one would have.
"""

from __future__ import annotations

import torch

from srcore.config import Params
from srcore.data.datasets import verify_prepared
from srcore.layout import Layout
from srcore.models.srresnet import SRResNet, build_generator
from srcore.training import distributed, steps
from srcore.training.loop import LoopState, LoopTracker, final_generator, make_ema, run_loop
from srcore.training.runtime import make_adam, maybe_compile, memory_format, setup_runtime
from srcore.training.session import training_session

#: params.yaml keys whose values change this stage's result (dvc.yaml's params, and what the
#: checkpoint fingerprint hashes beside the prepared data); log/val/checkpoint cadence and
#: runtime.num_workers change nothing (srcore.stages.NO_RESULT).
PARAMS = (
    "seed", "scale", "data.train", "data.val",
    "model.blocks", "model.channels", "model.global_skip",
    "pretrain.iterations", "pretrain.batch_size", "pretrain.hr_crop", "pretrain.lr",
    "pretrain.lr_schedule", "pretrain.beta1", "pretrain.beta2", "pretrain.augment",
    "pretrain.sampling", "pretrain.min_crop_std", "pretrain.ema_decay",
    "runtime.device", "runtime.channels_last", "runtime.precision", "runtime.compile",
    "runtime.deterministic", "runtime.distributed",
    "evaluate.crop_border",  # the validation PSNR-Y in metrics/<stage>.json
)


def run(params: Params, layout: Layout) -> None:
    """Train SRResNet (every process under torchrun), then save and register it (rank 0)."""
    # 1. params: pretrain (the recipe), model + scale (G), seed, runtime, data.train/val
    # 2. inputs: prepared/<train and val sets> (checked against their manifests first);
    #    checkpoints/pretrain.pt when resuming
    verify_prepared(layout.prepared, params.data, ("train", "val"))
    with training_session("pretrain", params, layout) as session:
        # 3. work
        model, metrics = train(params, layout, session.tracker)
        # 4. outputs: models/srresnet.pt, metrics/pretrain.json, MLflow model + registry
        session.save(model, "srresnet", metrics)


def train(params: Params, layout: Layout,
          tracker: LoopTracker) -> tuple[SRResNet, dict[str, float]]:
    """SRResNet with pixel MSE on [-1, 1] targets, Adam(beta1); the paper's constant learning
    rate, or (lr_schedule: cosine, beyond the paper) one annealed to 0 over the iterations,
    which a short run needs: its last steps at a small rate are worth more than extra ones.

    Under a process group: synchronised BN and DDP, so the result is single-process training
    on the same global batches up to float reduction order.
    """
    cfg = params.pretrain
    distributed.split_batch("pretrain.batch_size", cfg.batch_size, distributed.current())
    device = setup_runtime(params)
    fmt = memory_format(params)
    generator = distributed.sync_batchnorm(build_generator(params.model, params.scale), device)
    generator = generator.to(device, memory_format=fmt)
    opt = make_adam(generator, cfg.lr, (cfg.beta1, cfg.beta2), device)
    scheds = {}
    if cfg.lr_schedule == "cosine":
        scheds["generator"] = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.iterations)
    state = LoopState({"generator": generator}, {"generator": opt}, scheds,
                      ema=make_ema(cfg.ema_decay, generator))
    trained = distributed.data_parallel(generator, device)
    step = steps.make_pretrain_step(maybe_compile(params, trained), opt, params, device)
    generator.train()
    metrics = run_loop("pretrain", params, layout, tracker, cfg, state, generator, step, device)
    return final_generator(state, generator).cpu().eval(), metrics
