"""`srgan finetune`: SRGAN, the SRResNet fine-tuned with content + adversarial loss.

Writes models/srgan.pt and metrics/finetune.json, logs the run to MLflow and registers
'srgan'. Starts from models/srresnet.pt; checkpoints to checkpoints/finetune.pt and resumes
from it exactly, unless pretrain has since made another SRResNet.
"""

from __future__ import annotations

from pathlib import Path

import torch

from srcore.config import Params
from srcore.data.datasets import verify_prepared
from srcore.layout import Layout
from srcore.losses import ContentLoss
from srcore.models.discriminator import Discriminator
from srcore.models.srresnet import SRResNet, build_generator, generator_spec
from srcore.stages import UserError
from srcore.training import distributed, steps
from srcore.training.checkpoints import (
    CheckpointMismatch,
    file_digest,
    load_generator_file,
    load_state_checked,
)
from srcore.training.loop import LoopState, LoopTracker, final_generator, make_ema, run_loop
from srcore.training.runtime import make_adam, maybe_compile, memory_format, setup_runtime
from srcore.training.session import training_session

#: params.yaml keys whose values change this stage's result (dvc.yaml's params, and what the
#: checkpoint fingerprint hashes beside the prepared data and models/srresnet.pt).
PARAMS = (
    "seed", "scale", "data.train", "data.val",
    "model.blocks", "model.channels", "model.global_skip",
    "finetune.iterations", "finetune.batch_size", "finetune.hr_crop", "finetune.lr",
    "finetune.lr_second_half", "finetune.beta1", "finetune.beta2", "finetune.content_loss",
    "finetune.adv_weight", "finetune.d_steps", "finetune.d_channels", "finetune.augment",
    "finetune.sampling", "finetune.min_crop_std", "finetune.ema_decay",
    "runtime.device", "runtime.channels_last", "runtime.precision", "runtime.compile",
    "runtime.deterministic", "runtime.distributed",
    "evaluate.crop_border",  # the validation PSNR-Y in metrics/<stage>.json
)


def run(params: Params, layout: Layout) -> None:
    """Fine-tune (every process under torchrun), then save and register SRGAN (rank 0)."""
    # 1. params: finetune (the recipe, content_loss), model + scale (G), seed, runtime, data
    # 2. inputs: models/srresnet.pt, VGG19 weights (content_loss vgg22/vgg54), prepared/<train
    #    and val sets>, checkpoints/finetune.pt when resuming; missing ones fail before any work
    init = layout.model("srresnet")
    if not init.is_file():
        raise UserError(f"{init}: missing; run `srgan pretrain` first")
    verify_prepared(layout.prepared, params.data, ("train", "val"))
    vgg = None
    if params.finetune.content_loss != "mse":
        from srcore.models.vgg import load_vgg19_state_dict

        vgg = load_vgg19_state_dict(retries=params.download.retries,
                                    timeout=params.download.timeout_s)
    with training_session("finetune", params, layout, init=init) as session:
        # 3. work
        model, metrics = train(params, layout, session.tracker, vgg)
        # 4. outputs: models/srgan.pt, metrics/finetune.json, MLflow model + registry
        session.save(model, "srgan", metrics, blend_base=load_generator_file(init),
                     serve_alpha=params.tracking.serve_alpha)


def train(params: Params, layout: Layout, tracker: LoopTracker,
          vgg_state_dict: dict[str, torch.Tensor] | None = None,
          ) -> tuple[SRResNet, dict[str, float]]:
    """SRGAN: G from SRResNet, content + adv_weight * -log D(G(x)), k D steps per G step,
    Adam(beta1) at lr for the first half and lr_second_half from the midpoint (the paper's
    10^5 + 10^5 iterations at 1e-4 then 1e-5)."""
    cfg = params.finetune
    distributed.split_batch("finetune.batch_size", cfg.batch_size, distributed.current())
    device = setup_runtime(params)
    fmt = memory_format(params)
    init_path = layout.model("srresnet")
    generator = distributed.sync_batchnorm(load_initial_generator(params, init_path), device)
    generator = generator.to(device, memory_format=fmt)
    content = ContentLoss(cfg.content_loss, vgg_state_dict).to(device, memory_format=fmt)
    disc = distributed.sync_batchnorm(Discriminator(cfg.hr_crop, cfg.d_channels), device)
    disc = disc.to(device, memory_format=fmt)
    opt_g = make_adam(generator, cfg.lr, (cfg.beta1, cfg.beta2), device)
    opt_d = make_adam(disc, cfg.lr, (cfg.beta1, cfg.beta2), device)
    gamma = cfg.lr_second_half / cfg.lr
    half = max(1, cfg.iterations // 2)
    scheds = {
        "generator": torch.optim.lr_scheduler.MultiStepLR(opt_g, [half], gamma),
        "discriminator": torch.optim.lr_scheduler.MultiStepLR(opt_d, [half], gamma),
    }
    state = LoopState({"generator": generator, "discriminator": disc},
                      {"generator": opt_g, "discriminator": opt_d}, scheds,
                      ema=make_ema(cfg.ema_decay, generator))
    trained = distributed.data_parallel(generator, device)
    step = steps.make_finetune_step(maybe_compile(params, trained), disc, content, opt_g, opt_d,
                                    cfg, params, device)
    generator.train()
    disc.train()
    metrics = run_loop("finetune", params, layout, tracker, cfg, state, generator, step,
                       device, init_digest=file_digest(init_path))
    return final_generator(state, generator).cpu().eval(), metrics


def load_initial_generator(params: Params, path: Path) -> SRResNet:
    """G for fine-tuning from the pretrained SRResNet; refuses one of another shape or spec."""
    generator = build_generator(params.model, params.scale)
    saved = load_generator_file(path)
    load_state_checked(generator, saved.state_dict(), str(path))
    want, have = generator_spec(generator), generator_spec(saved)
    for key, value in want.items():
        if have[key] != value:
            raise CheckpointMismatch(
                f"{path}: '{key}' is {have[key]!r} but params say {value!r}; re-run "
                "`srgan pretrain` with the current params"
            )
    return generator
