"""SRResNet pretraining (pixel MSE) and SRGAN fine-tuning, with atomic checkpoints and resume."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from srcore.config import FinetuneConfig, Params, PretrainConfig
from srcore.data.datasets import Pair, RandomCropBatches, load_pairs
from srcore.layout import Layout
from srcore.losses import ContentLoss, discriminator_loss, generator_adversarial_loss
from srcore.metrics import psnr_y
from srcore.models.discriminator import Discriminator
from srcore.models.srresnet import SRResNet, build_generator, generator_spec
from srcore.tracking import Tracker
from srcore.upscale import lr_to_tensor, tensor_to_image


class CheckpointMismatch(ValueError):
    """Saved weights do not fit the network being built; the message names the key."""


# --------------------------------------------------------------------------- runtime helpers


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but no CUDA device is visible; use auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def setup_runtime(params: Params) -> torch.device:
    device = resolve_device(params.runtime.device)
    torch.manual_seed(params.seed)
    if params.runtime.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def memory_format(params: Params) -> torch.memory_format:
    return torch.channels_last if params.runtime.channels_last else torch.contiguous_format


def autocast(params: Params, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA only: CPU bf16 convolutions are slower than fp32 on most CPUs."""
    enabled = params.runtime.amp and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def make_adam(module: nn.Module, lr: float, betas: tuple[float, float],
              device: torch.device) -> torch.optim.Adam:
    fused = device.type == "cuda"
    return torch.optim.Adam(module.parameters(), lr=lr, betas=betas, fused=fused)


def load_state_checked(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict that names the first missing, unexpected or differently shaped key."""
    own = module.state_dict()
    for key, value in own.items():
        if key not in state:
            raise CheckpointMismatch(f"{what}: key '{key}' is missing (different model shape)")
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointMismatch(
                f"{what}: key '{key}' has shape {tuple(state[key].shape)}, the model expects "
                f"{tuple(value.shape)} (model params changed since it was saved)"
            )
    extra = sorted(set(state) - set(own))
    if extra:
        raise CheckpointMismatch(f"{what}: unexpected key '{extra[0]}' (different model shape)")
    module.load_state_dict(state)


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_generator(model: SRResNet, path: Path, extra: dict[str, Any]) -> None:
    """Weights plus the spec that rebuilds the network (inference needs global_skip etc.)."""
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    atomic_save({"spec": generator_spec(_unwrap(model)), "state_dict": state, **extra}, path)


def load_generator_file(path: Path) -> SRResNet:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the stage that makes it (dvc repro)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = SRResNet(**blob["spec"])
    load_state_checked(model, blob["state_dict"], str(path))
    return model.eval()


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


# ------------------------------------------------------------------------- checkpoints


def fingerprint(params: Params, stage: str) -> str:
    """What a checkpoint must share with the current params to be resumed."""
    relevant = {
        "seed": params.seed, "scale": params.scale,
        "data": params.data.model_dump(mode="json"),
        "model": params.model.model_dump(mode="json"),
        stage: getattr(params, stage).model_dump(mode="json"),
        "ema": params.runtime.ema_decay,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def read_checkpoint(path: Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """A resumable checkpoint, or None when there is none or it was made with other params."""
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a torn or foreign file is simply not resumable
        tqdm.write(f"ignoring unreadable checkpoint {path}: {err}")
        return None
    if ckpt.get("fingerprint") != expected_fingerprint:
        tqdm.write(f"ignoring checkpoint {path}: it was made with different params")
        return None
    return ckpt


@dataclass
class LoopState:
    """What the shared loop needs from a stage: step function, modules to checkpoint."""

    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any] = field(default_factory=dict)
    ema: torch.optim.swa_utils.AveragedModel | None = None


def _snapshot(state: LoopState, iteration: int, fp: str, run_id: str) -> dict[str, Any]:
    blob: dict[str, Any] = {
        "fingerprint": fp, "iteration": iteration, "run_id": run_id,
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": json.dumps(np.random.get_state()[1].tolist()),
    }
    for k, m in state.modules.items():
        blob[f"model.{k}"] = _unwrap(m).state_dict()
    for k, o in state.optimizers.items():
        blob[f"optim.{k}"] = o.state_dict()
    for k, s in state.schedulers.items():
        blob[f"sched.{k}"] = s.state_dict()
    if state.ema is not None:
        blob["ema"] = state.ema.state_dict()
    if torch.cuda.is_available():
        blob["cuda_rng"] = torch.cuda.get_rng_state_all()
    return blob


def _restore(state: LoopState, ckpt: dict[str, Any], path: Path) -> None:
    for k, m in state.modules.items():
        load_state_checked(_unwrap(m), ckpt[f"model.{k}"], f"{path} ({k})")
    for k, o in state.optimizers.items():
        o.load_state_dict(ckpt[f"optim.{k}"])
    for k, s in state.schedulers.items():
        s.load_state_dict(ckpt[f"sched.{k}"])
    if state.ema is not None and "ema" in ckpt:
        state.ema.load_state_dict(ckpt["ema"])
    torch.set_rng_state(ckpt["torch_rng"])
    if "cuda_rng" in ckpt and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])


# ------------------------------------------------------------------------- data + validation


def train_pairs(params: Params, layout: Layout) -> list[Pair]:
    pairs: list[Pair] = []
    for spec in params.data.train:
        pairs.extend(load_pairs(layout.prepared, spec.name))
    return pairs


def batches(params: Params, cfg: PretrainConfig | FinetuneConfig, pairs: list[Pair],
            start: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    dataset = RandomCropBatches(pairs, cfg.batch_size, cfg.hr_crop, params.scale,
                                params.seed, cfg.augment)
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


def validation_pairs(params: Params, layout: Layout, limit: int = 3,
                     max_lr: int = 96) -> list[Pair]:
    """A few centre-cropped held-out images: cheap enough to score every val_every steps."""
    pairs = load_pairs(layout.prepared, params.data.test[0].name)[:limit]
    out = []
    for p in pairs:
        h, w = p.lr.shape[:2]
        ch, cw = min(h, max_lr), min(w, max_lr)
        y, x = (h - ch) // 2, (w - cw) // 2
        s = params.scale
        out.append(Pair(p.name, p.hr[y * s:(y + ch) * s, x * s:(x + cw) * s],
                        p.lr[y:y + ch, x:x + cw]))
    return out


@torch.no_grad()
def validate(model: nn.Module, pairs: list[Pair], params: Params,
             device: torch.device) -> tuple[float, list[np.ndarray]]:
    was_training = model.training
    model.eval()
    scores, images = [], []
    for p in pairs:
        with autocast(params, device):
            sr = model(lr_to_tensor(p.lr, device, memory_format(params)))
        img = tensor_to_image(sr, grey=p.hr.ndim == 2)
        scores.append(psnr_y(img, p.hr, params.evaluate.crop_border))
        images.append(img)
    model.train(was_training)
    return float(np.mean(scores)), images


# ------------------------------------------------------------------------------- the loop


def _run_loop(stage: str, params: Params, layout: Layout, tracker: Tracker,
              cfg: PretrainConfig | FinetuneConfig, state: LoopState, generator: nn.Module,
              step_fn: Any, device: torch.device) -> dict[str, float]:
    """Shared loop: resume, progress bar, logging, validation, checkpoints, memory checks."""
    ckpt_path = layout.checkpoints / f"{stage}.pt"
    fp = fingerprint(params, stage)
    start = 0
    ckpt = read_checkpoint(ckpt_path, fp)
    if ckpt is not None:
        _restore(state, ckpt, ckpt_path)
        start = int(ckpt["iteration"])
        tqdm.write(f"{stage}: resuming from {ckpt_path} at iteration {start}")
    val = validation_pairs(params, layout)
    pairs = train_pairs(params, layout)
    sums: dict[str, float] = {}
    count = 0
    last: dict[str, float] = {}
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.iterations, initial=start, desc=stage, unit="it", dynamic_ncols=True)
    it = start
    for it, (lr, hr) in enumerate(batches(params, cfg, pairs, start, device), start=start + 1):
        losses = step_fn(lr, hr)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        if state.ema is not None:
            state.ema.update_parameters(_unwrap(generator))
        for s in state.schedulers.values():
            s.step()
        bar.update(1)
        if it % cfg.log_every == 0 or it == cfg.iterations:
            last = {k: v / count for k, v in sums.items()}
            bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if "loss" in k})
            tracker.log_metrics({f"{stage}/{k}": v for k, v in last.items()}, step=it)
            if device.type == "cuda":
                tracker.log_metrics(
                    {"cuda_max_mem_mb": torch.cuda.max_memory_allocated() / 2**20}, step=it)
            sums, count = {}, 0
        if it % cfg.val_every == 0 or it == cfg.iterations:
            net = state.ema.module if state.ema is not None else generator
            score, images = validate(net, val, params, device)
            last["val_psnr_y"] = score
            tracker.log_metrics({f"{stage}/val_psnr_y": score}, step=it)
            for p, img in zip(val, images, strict=True):
                tracker.log_image(img, f"val/{stage}/{it:07d}_{p.name}.png")
        if it % cfg.checkpoint_every == 0 and it < cfg.iterations:
            atomic_save(_snapshot(state, it, fp, tracker.run_id), ckpt_path)
    bar.close()
    seconds = time.perf_counter() - t0
    done = it - start
    last.update({
        "iterations": float(cfg.iterations),
        "seconds": seconds,
        "patches_per_s": done * cfg.batch_size / seconds if seconds > 0 else 0.0,
    })
    return last


def _final_generator(state: LoopState, generator: nn.Module) -> SRResNet:
    if state.ema is not None:
        return _unwrap(state.ema.module)
    return _unwrap(generator)


def _ema(params: Params, model: nn.Module) -> torch.optim.swa_utils.AveragedModel | None:
    decay = params.runtime.ema_decay
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _maybe_compile(params: Params, model: nn.Module) -> nn.Module:
    return torch.compile(model) if params.runtime.compile else model


def pretrain(params: Params, layout: Layout, tracker: Tracker) -> tuple[SRResNet, dict[str, float]]:
    """SRResNet with pixel MSE on [-1, 1] targets, Adam(beta1), constant learning rate."""
    cfg = params.pretrain
    device = setup_runtime(params)
    fmt = memory_format(params)
    generator = build_generator(params.model, params.scale).to(device, memory_format=fmt)
    opt = make_adam(generator, cfg.lr, (cfg.beta1, cfg.beta2), device)
    state = LoopState({"generator": generator}, {"generator": opt}, ema=_ema(params, generator))
    g = _maybe_compile(params, generator)
    mse = nn.MSELoss()

    def step(lr: torch.Tensor, hr: torch.Tensor) -> dict[str, float]:
        with autocast(params, device):
            loss = mse(g(lr).float(), hr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss_mse": loss.detach().item()}

    generator.train()
    metrics = _run_loop("pretrain", params, layout, tracker, cfg, state, generator, step, device)
    return _final_generator(state, generator).cpu().eval(), metrics


def finetune(params: Params, layout: Layout, tracker: Tracker,
             vgg_state_dict: dict[str, torch.Tensor] | None = None,
             ) -> tuple[SRResNet, dict[str, float]]:
    """SRGAN: G from SRResNet, content + adv_weight * -log D(G(x)), k D steps per G step."""
    cfg = params.finetune
    device = setup_runtime(params)
    fmt = memory_format(params)
    content = ContentLoss(cfg.content_loss, vgg_state_dict).to(device, memory_format=fmt)
    generator = build_generator(params.model, params.scale)
    load_state_checked(generator, load_generator_file(layout.model("srresnet")).state_dict(),
                       str(layout.model("srresnet")))
    generator = generator.to(device, memory_format=fmt)
    disc = Discriminator(cfg.hr_crop, cfg.d_channels).to(device, memory_format=fmt)
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
                      ema=_ema(params, generator))
    g, d = _maybe_compile(params, generator), disc

    def step(lr: torch.Tensor, hr: torch.Tensor) -> dict[str, float]:
        out: dict[str, float] = {}
        for _ in range(cfg.d_steps):
            with torch.no_grad(), autocast(params, device):
                fake = g(lr)
            with autocast(params, device):
                real_logits, fake_logits = d(hr).float(), d(fake.detach()).float()
            loss_real, loss_fake = discriminator_loss(real_logits, fake_logits)
            opt_d.zero_grad(set_to_none=True)
            (loss_real + loss_fake).backward()
            opt_d.step()
        with autocast(params, device):
            sr = g(lr)
            adv_logits = d(sr).float()
            loss_content = content(sr.float(), hr)
        loss_adv = generator_adversarial_loss(adv_logits)
        loss_g = loss_content + cfg.adv_weight * loss_adv
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        out.update({
            "loss_g": loss_g.detach().item(),
            "loss_g_content": loss_content.detach().item(),
            "loss_g_adv": loss_adv.detach().item(),
            "loss_d_real": loss_real.detach().item(),
            "loss_d_fake": loss_fake.detach().item(),
            "d_real_mean": torch.sigmoid(real_logits).mean().item(),
            "d_fake_mean": torch.sigmoid(fake_logits).mean().item(),
        })
        return out

    generator.train()
    disc.train()
    metrics = _run_loop("finetune", params, layout, tracker, cfg, state, generator, step, device)
    return _final_generator(state, generator).cpu().eval(), metrics
