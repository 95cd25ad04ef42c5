"""One training iteration of each stage, built once and called per batch.

The stages and the throughput benchmark (benchmarks/train_throughput.py) build their steps
here, so the benchmark times exactly the code the stages run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from srcore.config import FinetuneConfig, Params
from srcore.losses import discriminator_loss, generator_adversarial_loss
from srcore.training import distributed
from srcore.training.runtime import AmpContext, precision

#: One training iteration: (LR batch, HR batch) -> losses as plain floats. Floats, not
#: tensors, so nothing the loop keeps can pin a graph or device memory across iterations.
StepFn = Callable[[torch.Tensor, torch.Tensor], dict[str, float]]


def _autocast(params: Params, device: torch.device) -> AmpContext:
    """runtime.precision's autocast, resolved once (not per step)."""
    chosen = precision(params, device)
    return lambda: chosen.autocast(device)


def make_pretrain_step(generator: nn.Module, opt: torch.optim.Optimizer, params: Params,
                       device: torch.device, amp: AmpContext | None = None) -> StepFn:
    """One Adam step on pixel MSE between G(LR) and HR, both in [-1, 1].

    `amp` overrides the mixed-precision context (the benchmark tries CPU bf16 with it).
    """
    amp = amp or _autocast(params, device)

    def step(lr: torch.Tensor, hr: torch.Tensor) -> dict[str, float]:
        with amp():
            sr = generator(lr)
        loss = F.mse_loss(sr.float(), hr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss_mse": loss.item()}

    return step


def make_finetune_step(generator: nn.Module, disc: nn.Module, content: nn.Module,
                       opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                       cfg: FinetuneConfig, params: Params, device: torch.device,
                       amp: AmpContext | None = None) -> StepFn:
    """k = cfg.d_steps D updates, then one G update on content + adv_weight * -log D(G(x)).

    G runs forward once per iteration: D trains on the detached SR batch, and G's loss reuses
    the same graph (G's weights do not change in between, so this is the same objective as a
    second forward, at two thirds of G's cost). D's weights are frozen while G's loss is
    back-propagated: G only needs dL/dSR, not D's weight gradients.

    Distributed: pass G wrapped by `distributed.data_parallel`; D's gradients are averaged
    here by hand (two forwards per D update are more than DDP's reducer allows).
    """
    amp = amp or _autocast(params, device)

    def step(lr: torch.Tensor, hr: torch.Tensor) -> dict[str, float]:
        with amp():
            sr = generator(lr)
        fake = sr.detach()
        for _ in range(cfg.d_steps):
            with amp():
                real_logits, fake_logits = disc(hr).float(), disc(fake).float()
            loss_real, loss_fake = discriminator_loss(real_logits, fake_logits)
            opt_d.zero_grad(set_to_none=True)
            (loss_real + loss_fake).backward()
            distributed.average_gradients(disc)  # no-op in one process; D is not DDP-wrapped
            opt_d.step()
        disc.requires_grad_(False)
        try:
            with amp():
                adv_logits = disc(sr).float()
                loss_content = content(sr.float(), hr)
            loss_adv = generator_adversarial_loss(adv_logits)
            loss_g = loss_content + cfg.adv_weight * loss_adv
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
        finally:
            disc.requires_grad_(True)
        opt_g.step()
        values = torch.stack([
            loss_g, loss_content, loss_adv, loss_real, loss_fake,
            torch.sigmoid(real_logits).mean(), torch.sigmoid(fake_logits).mean(),
        ]).detach().float().tolist()  # one device sync, not seven
        keys = ("loss_g", "loss_g_content", "loss_g_adv", "loss_d_real", "loss_d_fake",
                "d_real_mean", "d_fake_mean")
        return dict(zip(keys, values, strict=True))

    return step
