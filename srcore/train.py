"""SRResNet pretraining (pixel MSE) and SRGAN fine-tuning, with atomic checkpoints and resume.

Resume is exact: a batch is a pure function of (seed, iteration) and a checkpoint holds every
piece of state that changes during training (weights, BN statistics, optimisers, schedulers,
EMA, RNG, the running log averages), so a killed and resumed run ends with the same weights,
bit for bit, as an uninterrupted one on the same machine and settings.

The step functions are built by `make_pretrain_step` / `make_finetune_step` so that the
throughput benchmark times exactly the code the stages run.

Under torchrun (runtime.distributed, srcore/distributed.py) the same loop runs in every
process on its slice of each global batch; rank 0 alone validates, logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from srcore import distributed
from srcore.config import FinetuneConfig, Params, PretrainConfig
from srcore.data.datasets import Pair, RandomCropBatches, load_pairs
from srcore.distributed import resolve_device
from srcore.layout import Layout
from srcore.losses import ContentLoss, discriminator_loss, generator_adversarial_loss
from srcore.metrics import psnr_y
from srcore.models.discriminator import Discriminator
from srcore.models.srresnet import SRResNet, build_generator, generator_spec
from srcore.upscale import lr_to_tensor, tensor_to_image

#: One training iteration: (LR batch, HR batch) -> losses as plain floats. Floats, not
#: tensors, so nothing the loop keeps can pin a graph or device memory across iterations.
StepFn = Callable[[torch.Tensor, torch.Tensor], dict[str, float]]
#: Opens the mixed-precision context of a step (default: `autocast(params, device)`).
AmpContext = Callable[[], contextlib.AbstractContextManager[Any]]


class LoopTracker(Protocol):
    """What the loop logs through: tracking.Tracker, or distributed.NullTracker off rank 0."""

    run_id: str

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_image(self, image: np.ndarray, name: str) -> None: ...


class CheckpointMismatch(ValueError):
    """Saved weights do not fit the network being built; the message names the key."""


class UnreadableWeights(CheckpointMismatch):
    """A weights file that torch.load(weights_only=True) refuses: torn, foreign or pickled
    code. A subclass so the CLI reports it as one line, like a shape mismatch."""


# --------------------------------------------------------------------------- runtime helpers


def setup_runtime(params: Params) -> torch.device:
    """Seed, determinism and cuDNN/TF32 switches; set both ways so a process is never left
    deterministic (or not) by an earlier stage run in the same interpreter."""
    device = resolve_device(params.runtime.device)
    torch.manual_seed(params.seed)
    deterministic = params.runtime.deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    fast_cuda = device.type == "cuda" and not deterministic
    torch.backends.cudnn.benchmark = fast_cuda
    torch.backends.cuda.matmul.allow_tf32 = fast_cuda
    torch.backends.cudnn.allow_tf32 = fast_cuda
    return device


def memory_format(params: Params) -> torch.memory_format:
    return torch.channels_last if params.runtime.channels_last else torch.contiguous_format


def cpu_has_native_bf16() -> bool:
    """oneDNN runs bf16 natively (AVX512-BF16 / AMX): 2.2-2.5x faster steps measured on a
    2-core Zen 4 (benchmarks/train_throughput.py); elsewhere bf16 is emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_enabled(params: Params, device: torch.device) -> bool:
    if not params.runtime.amp:
        return False
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def autocast(params: Params, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast (runtime.amp) on CUDA, and on CPUs with native bf16 support."""
    enabled = amp_enabled(params, device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def make_adam(module: nn.Module, lr: float, betas: tuple[float, float],
              device: torch.device) -> torch.optim.Adam:
    """Fused Adam (one kernel for all parameters) on CUDA and CPU: the per-parameter loop of
    the default implementation dominates small models' steps on CPU."""
    fused = device.type in ("cuda", "cpu")
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
    """torch.save to a temporary name, fsync, rename: a kill (or power loss) at any moment
    leaves either the previous file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_generator(model: SRResNet, path: Path, extra: dict[str, Any]) -> None:
    """Weights plus the spec that rebuilds the network (inference needs global_skip etc.)."""
    state = {k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()}
    atomic_save({"spec": generator_spec(_unwrap(model)), "state_dict": state, **extra}, path)


def load_generator_file(path: Path) -> SRResNet:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the stage that makes it (dvc repro)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        spec = blob["spec"]
    except Exception as err:  # noqa: BLE001 - any unusable file gets the same advice
        raise UnreadableWeights(
            f"{path}: not a generator weights file ({type(err).__name__}: {err}); "
            "re-run the stage that makes it (dvc repro)") from None
    model = SRResNet(**spec)
    load_state_checked(model, blob["state_dict"], str(path))
    return model.eval()


def _say(message: str) -> None:
    """A diagnostic on stderr that does not break the progress bar (stdout stays clean)."""
    tqdm.write(message, file=sys.stderr)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def file_digest(path: Path) -> str:
    """Content hash of a file (the SRResNet that a fine-tuning run started from)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


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


def read_checkpoint(path: Path, expected_fingerprint: str,
                    init_digest: str | None = None) -> dict[str, Any] | None:
    """A resumable checkpoint, or None when there is none or it was made with other params.

    `init_digest` (fine-tuning): the hash of the SRResNet the run starts from; a checkpoint
    of a run that started from another SRResNet (pretrain was re-run) is not resumed.
    """
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a torn or foreign file is simply not resumable
        _say(f"ignoring unreadable checkpoint {path}: {err}")
        return None
    if not isinstance(ckpt, dict) or ckpt.get("fingerprint") != expected_fingerprint:
        _say(f"ignoring checkpoint {path}: it was made with different params")
        return None
    if init_digest is not None and ckpt.get("init_digest") not in (None, init_digest):
        _say(f"ignoring checkpoint {path}: it started from another models/srresnet.pt")
        return None
    return ckpt


@dataclass
class LoopState:
    """What the shared loop checkpoints: modules, optimisers, schedulers, EMA, log sums."""

    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any] = field(default_factory=dict)
    ema: torch.optim.swa_utils.AveragedModel | None = None
    log_sums: dict[str, float] = field(default_factory=dict)
    log_count: int = 0


def _snapshot(state: LoopState, iteration: int, fp: str, run_id: str,
              init_digest: str | None) -> dict[str, Any]:
    blob: dict[str, Any] = {
        "fingerprint": fp, "iteration": iteration, "run_id": run_id,
        "init_digest": init_digest,
        "torch_rng": torch.get_rng_state(),
        "log_sums": dict(state.log_sums), "log_count": state.log_count,
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
    try:
        for k, m in state.modules.items():
            load_state_checked(_unwrap(m), ckpt[f"model.{k}"], f"{path} ({k})")
        if state.ema is not None:
            load_state_checked(state.ema, ckpt["ema"], f"{path} (ema)")
    except CheckpointMismatch as err:
        raise CheckpointMismatch(f"{err}; delete {path} to start this stage over") from None
    for k, o in state.optimizers.items():
        o.load_state_dict(ckpt[f"optim.{k}"])
    for k, s in state.schedulers.items():
        s.load_state_dict(ckpt[f"sched.{k}"])
    state.log_sums = dict(ckpt.get("log_sums", {}))
    state.log_count = int(ckpt.get("log_count", 0))
    torch.set_rng_state(ckpt["torch_rng"])
    if "cuda_rng" in ckpt and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])


# ------------------------------------------------------------------------- data + validation


def train_pairs(params: Params, layout: Layout) -> list[Pair]:
    pairs: list[Pair] = []
    for spec in params.data.train:
        pairs.extend(load_pairs(layout.prepared, spec.name, params.scale))
    return pairs


def batches(params: Params, cfg: PretrainConfig | FinetuneConfig, pairs: list[Pair],
            start: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of iterations start+1 .. cfg.iterations (item i is iteration i+1's batch);
    under a process group, this process's slice of each global batch."""
    world = distributed.current()
    dataset = RandomCropBatches(pairs, cfg.batch_size, cfg.hr_crop, params.scale,
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


def validation_pairs(params: Params, layout: Layout, limit: int = 3,
                     max_lr: int = 96) -> list[Pair]:
    """A few centre-cropped validation images (data.val, never a test set): cheap enough to
    score every val_every steps."""
    pairs = load_pairs(layout.prepared, params.data.val[0].name, params.scale)[:limit]
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


# ------------------------------------------------------------------------------ the steps


def make_pretrain_step(generator: nn.Module, opt: torch.optim.Optimizer, params: Params,
                       device: torch.device, amp: AmpContext | None = None) -> StepFn:
    """One Adam step on pixel MSE between G(LR) and HR, both in [-1, 1].

    `amp` overrides the mixed-precision context (the benchmark tries CPU bf16 with it).
    """
    amp = amp or (lambda: autocast(params, device))

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
    amp = amp or (lambda: autocast(params, device))

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


# ------------------------------------------------------------------------------- the loop


def _run_loop(stage: str, params: Params, layout: Layout, tracker: LoopTracker,
              cfg: PretrainConfig | FinetuneConfig, state: LoopState, generator: nn.Module,
              step_fn: StepFn, device: torch.device,
              init_digest: str | None = None) -> dict[str, float]:
    """Shared loop: resume, progress bar, logging, validation, checkpoints.

    Distributed, every process runs it; rank 0 alone reads the checkpoint (and broadcasts
    it), validates and writes checkpoints, and the losses are averaged over processes.
    """
    main = distributed.current().is_main
    ckpt_path = layout.checkpoints / f"{stage}.pt"
    fp = fingerprint(params, stage)
    start = 0
    ckpt = distributed.broadcast(read_checkpoint(ckpt_path, fp, init_digest) if main else None)
    if ckpt is not None:
        _restore(state, ckpt, ckpt_path)
        start = int(ckpt["iteration"])
        if main:
            _say(f"{stage}: resuming from {ckpt_path} at iteration {start}")
        tracker.log_metrics({f"{stage}/resumed_at": start}, step=start)
        del ckpt  # the optimiser state in it would otherwise live as long as the loop
    val = validation_pairs(params, layout) if main else []
    pairs = train_pairs(params, layout)
    last: dict[str, float] = {}
    first_opt = next(iter(state.optimizers.values()))
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.iterations, initial=start, desc=stage, unit="it", dynamic_ncols=True,
               disable=not main)
    it = start
    for it, (lr, hr) in enumerate(batches(params, cfg, pairs, start, device), start=start + 1):
        losses = distributed.average(step_fn(lr, hr))
        for k, v in losses.items():
            state.log_sums[k] = state.log_sums.get(k, 0.0) + v
        state.log_count += 1
        lr_used = first_opt.param_groups[0]["lr"]  # before the scheduler moves it on
        if state.ema is not None:
            state.ema.update_parameters(_unwrap(generator))
        for s in state.schedulers.values():
            s.step()
        bar.update(1)
        if it % cfg.log_every == 0 or it == cfg.iterations:
            last = {k: v / state.log_count for k, v in state.log_sums.items()}
            bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if "loss" in k})
            logged = {f"{stage}/{k}": v for k, v in last.items()}
            logged[f"{stage}/lr"] = lr_used
            if device.type == "cuda":
                logged["cuda_max_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
            tracker.log_metrics(logged, step=it)
            state.log_sums, state.log_count = {}, 0
        if main and (it % cfg.val_every == 0 or it == cfg.iterations):
            net = state.ema.module if state.ema is not None else generator
            score, images = validate(net, val, params, device)
            last["val_psnr_y"] = score
            tracker.log_metrics({f"{stage}/val_psnr_y": score}, step=it)
            for p, img in zip(val, images, strict=True):
                tracker.log_image(img, f"val/{stage}/{it:07d}_{p.name}.png")
        if main and it % cfg.checkpoint_every == 0 and it < cfg.iterations:
            atomic_save(_snapshot(state, it, fp, tracker.run_id, init_digest), ckpt_path)
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
    """The weights to save (EMA when on), with plain BatchNorm layers again."""
    net = _unwrap(state.ema.module) if state.ema is not None else _unwrap(generator)
    return distributed.plain_batchnorm(net)  # type: ignore[return-value]


def _check_batch(stage: str, cfg: PretrainConfig | FinetuneConfig) -> None:
    distributed.split_batch(f"{stage}.batch_size", cfg.batch_size, distributed.current())


def _ema(params: Params, model: nn.Module) -> torch.optim.swa_utils.AveragedModel | None:
    """EMA of G's weights and BN statistics (beyond the paper); None when ema_decay is null."""
    decay = params.runtime.ema_decay
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _maybe_compile(params: Params, model: nn.Module) -> nn.Module:
    return torch.compile(model) if params.runtime.compile else model


def pretrain(params: Params, layout: Layout,
             tracker: LoopTracker) -> tuple[SRResNet, dict[str, float]]:
    """SRResNet with pixel MSE on [-1, 1] targets, Adam(beta1); the paper's constant learning
    rate, or (lr_schedule: cosine, beyond the paper) one annealed to 0 over the iterations,
    which a short run needs: its last steps at a small rate are worth more than extra ones.

    Under a process group: synchronised BN and DDP, so the result is single-process training
    on the same global batches up to float reduction order.
    """
    cfg = params.pretrain
    _check_batch("pretrain", cfg)
    device = setup_runtime(params)
    fmt = memory_format(params)
    generator = distributed.sync_batchnorm(build_generator(params.model, params.scale), device)
    generator = generator.to(device, memory_format=fmt)
    opt = make_adam(generator, cfg.lr, (cfg.beta1, cfg.beta2), device)
    scheds = {}
    if cfg.lr_schedule == "cosine":
        scheds["generator"] = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.iterations)
    state = LoopState({"generator": generator}, {"generator": opt}, scheds,
                      ema=_ema(params, generator))
    trained = distributed.data_parallel(generator, device)
    step = make_pretrain_step(_maybe_compile(params, trained), opt, params, device)
    generator.train()
    metrics = _run_loop("pretrain", params, layout, tracker, cfg, state, generator, step, device)
    return _final_generator(state, generator).cpu().eval(), metrics


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


def finetune(params: Params, layout: Layout, tracker: LoopTracker,
             vgg_state_dict: dict[str, torch.Tensor] | None = None,
             ) -> tuple[SRResNet, dict[str, float]]:
    """SRGAN: G from SRResNet, content + adv_weight * -log D(G(x)), k D steps per G step,
    Adam(beta1) at lr for the first half and lr_second_half from the midpoint (the paper's
    10^5 + 10^5 iterations at 1e-4 then 1e-5)."""
    cfg = params.finetune
    _check_batch("finetune", cfg)
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
                      ema=_ema(params, generator))
    trained = distributed.data_parallel(generator, device)
    step = make_finetune_step(_maybe_compile(params, trained), disc, content, opt_g, opt_d,
                              cfg, params, device)
    generator.train()
    disc.train()
    metrics = _run_loop("finetune", params, layout, tracker, cfg, state, generator, step,
                        device, init_digest=file_digest(init_path))
    return _final_generator(state, generator).cpu().eval(), metrics
