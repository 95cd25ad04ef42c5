"""Data-parallel training launched by torchrun: process group, batch slices, rank-0-only I/O.

`torchrun --nproc_per_node N -m srcore.cli pretrain` with `runtime.distributed: true` trains
one model with N processes (NCCL on CUDA, one GPU per process; Gloo on CPU). Every process
takes its slice of the global batch of iteration i (params' batch_size), drawn from the same
(seed, i) generator, so together they see exactly the batch a single process would. Gradients
are averaged (DistributedDataParallel for G), BatchNorm statistics are taken over the whole
global batch (synchronised BN) and the logged losses are averaged over processes, so N
processes follow single-process training up to float reduction order. Only rank 0 talks to
MLflow and writes files; on resume rank 0 reads the checkpoint and broadcasts it, so the other
processes (other machines included) need no copy of checkpoints/.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from srcore.config import ConfigError, RuntimeConfig
from srcore.training.runtime import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job; rank 0 of a world of 1 when not distributed."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        return dist.get_backend() if _initialized() else None


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def current() -> World:
    """The world of the initialised process group (however it was initialised), else 1."""
    if not _initialized():
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def launched_world_size() -> int | None:
    """WORLD_SIZE set by torchrun (or any env:// launcher); None for a plain process."""
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value and "RANK" in os.environ else None


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def session(runtime: RuntimeConfig) -> Iterator[World]:
    """The process group for one stage: joined from torchrun's environment, torn down after.

    A group that already exists (a caller set it up) is used and left alone. N processes
    started with runtime.distributed false are refused: each would train its own model and
    they would overwrite each other's outputs.
    """
    if _initialized():
        yield current()
        dist.barrier()  # rank 0 may still be writing outputs the next step reads
        return
    size = launched_world_size()
    if size is None:
        if runtime.distributed:
            _say("runtime.distributed is true but this process was not started by torchrun "
                 "(no WORLD_SIZE/RANK): training in this one process")
        yield World()
        return
    if not runtime.distributed:
        if size > 1:
            raise ConfigError(
                f"params.yaml: this is one of {size} processes started by torchrun, but key "
                "'runtime.distributed' is false; set it to true, or run `srgan <stage>` "
                "without torchrun")
        yield World()
        return
    device = resolve_device(runtime.device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    try:
        world = current()
        yield world
        dist.barrier()
    finally:
        dist.destroy_process_group()


def split_batch(key: str, batch_size: int, world: World) -> int:
    """Per-process batch size; the global batch stays what params.yaml states."""
    if batch_size % world.size:
        raise ConfigError(
            f"params.yaml: key '{key}' is {batch_size}, which does not split evenly over "
            f"{world.size} processes (WORLD_SIZE); the global batch is shared equally, so "
            f"make it a multiple of {world.size} or change the number of processes")
    return batch_size // world.size


def run_params(world: World, batch_size: int) -> dict[str, Any]:
    """What MLflow records about the job's shape (the global batch is params' batch_size)."""
    return {
        "distributed.world_size": world.size,
        "distributed.backend": world.backend or "none",
        "distributed.global_batch_size": batch_size,
        "distributed.batch_size_per_process": batch_size // world.size,
    }


# ------------------------------------------------------------------------- collectives


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average(values: Mapping[str, float]) -> dict[str, float]:
    """Mean over processes of per-process floats (losses on equal slices = global-batch loss)."""
    if not _initialized() or dist.get_world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                     device=_collective_device())
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def broadcast(obj: T) -> T:
    """rank 0's object on every process (a checkpoint: only rank 0's disk needs to hold it)."""
    if not _initialized() or dist.get_world_size() == 1:
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def average_gradients(module: nn.Module) -> None:
    """All-reduce (mean) of a module's gradients in one flat buffer.

    For D, which is not wrapped in DDP: it runs forward twice per update (real batch, fake
    batch, each with its own BN statistics as in single-process training), and DDP's reducer
    allows one forward per backward.
    """
    if not _initialized() or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view(g.shape))
        offset += n


def data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP around `module` when there is a process group of more than one process."""
    if not _initialized() or dist.get_world_size() == 1:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


# --------------------------------------------------------------------------- BatchNorm


class _GatherRows(torch.autograd.Function):
    """Every process's 1-D tensor as the rows of one (world, k) tensor, differentiable.

    Each process's loss uses every row, so the gradient of row r is the sum over processes of
    their gradients for that row: one all-reduce backward, as one all-gather forward.
    """

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor) -> torch.Tensor:
        rows = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, local.contiguous())
        return torch.stack(rows)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total[dist.get_rank()]


class GlooSyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover every process's slice of the batch.

    torch's SyncBatchNorm runs on GPUs only; this one runs on CPU with Gloo. Each process
    computes its slice's count, mean and sum of squared deviations (two passes, fp32), one
    differentiable all-gather shares them, and they are combined exactly (Chan et al.'s
    parallel variance, no E[x^2] - E[x]^2 cancellation): one collective per layer forward and
    one backward. Eval mode and a world of one are plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf = x.float()
        c, dims = xf.shape[1], [0, 2, 3]
        count = xf.numel() // c
        local_mean = xf.mean(dims)
        local_m2 = (xf - local_mean.view(1, c, 1, 1)).square().sum(dims)
        rows = _GatherRows.apply(torch.cat([local_mean, local_m2, xf.new_full((1,), count)]))
        means, m2s, counts = rows[:, :c], rows[:, c:2 * c], rows[:, 2 * c:]
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        var = (m2s.sum(0) + (counts * (means - mean).square()).sum(0)) / n
        if self.track_running_stats and self.running_mean is not None \
                and self.running_var is not None and self.num_batches_tracked is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = (self.momentum if self.momentum is not None
                     else 1.0 / float(self.num_batches_tracked))
                unbiased = var.detach() * (n / (n - 1))
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                self.running_var.mul_(1 - f).add_(unbiased, alpha=f)
        out = (xf - mean.view(1, c, 1, 1)) * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return out.to(x.dtype)


def _replace_bn(module: nn.Module, make: Any, kinds: tuple[type, ...]) -> nn.Module:
    if isinstance(module, kinds):
        new = make(module)
        new.weight, new.bias = module.weight, module.bias  # the same Parameter objects
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(new, name, getattr(module, name))
        new.train(module.training)
        return new
    for name, child in module.named_children():
        replaced = _replace_bn(child, make, kinds)
        if replaced is not child:
            module.add_module(name, replaced)
    return module


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm over the global batch when distributed: torch's SyncBatchNorm on CUDA,
    GlooSyncBatchNorm2d elsewhere. Parameters and buffers are shared, not copied, so the
    state dict keeps its keys and checkpoints load either way."""
    if not _initialized() or dist.get_world_size() == 1:
        return module
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)

    def make(bn: nn.BatchNorm2d) -> nn.Module:
        return GlooSyncBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine,
                                   bn.track_running_stats)

    return _replace_bn(module, make, (nn.BatchNorm2d,))


def plain_batchnorm(module: nn.Module) -> nn.Module:
    """Undo sync_batchnorm, so the saved and logged model runs without a process group and
    unpickles without srcore.training.distributed."""

    def make(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
        return nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine,
                              bn.track_running_stats)

    return _replace_bn(module, make, (nn.SyncBatchNorm, GlooSyncBatchNorm2d))


# ----------------------------------------------------------------------------- tracker


class NullTracker:
    """The tracker of ranks other than 0: same methods as tracking.Tracker, does nothing, so
    N processes make one MLflow run, one registered version and one set of files."""

    run_id = "not-rank-0"

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_image(self, image: Any, name: str) -> None:
        pass

    def log_artifact(self, path: Any, folder: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_generator(self, model: Any, name: str, register: bool,
                      tags: Mapping[str, Any] | None = None, *, blend_base: Any = None,
                      serve_alpha: float | None = None) -> str | None:
        return None
