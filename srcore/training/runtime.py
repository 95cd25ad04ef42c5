"""How training runs on this machine: device, seeding and determinism, memory format, precision
(bf16 autocast or fp32, srcore.precision), fused Adam and torch.compile, each set from
params.runtime."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from srcore.config import Params
from srcore.precision import Precision
from srcore.precision import resolve as resolve_precision

#: Opens the mixed-precision context of a step (default: `autocast(params, device)`).
AmpContext = Callable[[], contextlib.AbstractContextManager[Any]]


def resolve_device(name: str) -> torch.device:
    """runtime.device as a torch.device; under a process group each process owns the GPU of
    its LOCAL_RANK (torchrun --nproc_per_node = GPUs per machine)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but no CUDA device is visible; use auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.is_available() and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


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


def precision(params: Params, device: torch.device) -> Precision:
    """runtime.precision resolved for `device` (auto: bf16 where it runs natively, else fp32);
    the stages print, log, tag and checkpoint its `describe()`, so no run is silently either."""
    return resolve_precision(params.runtime.precision, device)


def autocast(params: Params, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of runtime.precision on `device` (a no-op context for fp32)."""
    return precision(params, device).autocast(device)


def make_adam(module: nn.Module, lr: float, betas: tuple[float, float],
              device: torch.device) -> torch.optim.Adam:
    """Fused Adam (one kernel for all parameters) on CUDA and CPU: the per-parameter loop of
    the default implementation dominates small models' steps on CPU."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.Adam(module.parameters(), lr=lr, betas=betas, fused=fused)


def maybe_compile(params: Params, model: nn.Module) -> nn.Module:
    return torch.compile(model) if params.runtime.compile else model


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside torch.compile's wrapper (whose state-dict keys carry a prefix)."""
    return getattr(model, "_orig_mod", model)
