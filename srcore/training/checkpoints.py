"""Weights and resume state on disk: atomic saves, generator files, checkpoints that are
resumed only under the params (and the SRResNet) they were made with.

Every file is read with torch.load(weights_only=True): a foreign or tampered file is refused,
never executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm import tqdm

from srcore.config import Params
from srcore.models.srresnet import SRResNet, generator_spec
from srcore.training.runtime import unwrap

if TYPE_CHECKING:
    from srcore.training.loop import LoopState


class CheckpointMismatch(ValueError):
    """Saved weights do not fit the network being built; the message names the key."""


class UnreadableWeights(CheckpointMismatch):
    """A weights file that torch.load(weights_only=True) refuses: torn, foreign or pickled
    code. A subclass so the CLI reports it as one line, like a shape mismatch."""


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


# ------------------------------------------------------------------------ generator files


def save_generator(model: SRResNet, path: Path, extra: dict[str, Any]) -> None:
    """Weights plus the spec that rebuilds the network (inference needs global_skip etc.)."""
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    atomic_save({"spec": generator_spec(unwrap(model)), "state_dict": state, **extra}, path)


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


def file_digest(path: Path) -> str:
    """Content hash of a file (the SRResNet that a fine-tuning run started from)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- checkpoints


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


def snapshot(state: LoopState, iteration: int, fp: str, run_id: str,
             init_digest: str | None) -> dict[str, Any]:
    """Everything that changes during training, as one torch.save-able dict."""
    blob: dict[str, Any] = {
        "fingerprint": fp, "iteration": iteration, "run_id": run_id,
        "init_digest": init_digest,
        "torch_rng": torch.get_rng_state(),
        "log_sums": dict(state.log_sums), "log_count": state.log_count,
    }
    for k, m in state.modules.items():
        blob[f"model.{k}"] = unwrap(m).state_dict()
    for k, o in state.optimizers.items():
        blob[f"optim.{k}"] = o.state_dict()
    for k, s in state.schedulers.items():
        blob[f"sched.{k}"] = s.state_dict()
    if state.ema is not None:
        blob["ema"] = state.ema.state_dict()
    if torch.cuda.is_available():
        blob["cuda_rng"] = torch.cuda.get_rng_state_all()
    return blob


def restore(state: LoopState, ckpt: dict[str, Any], path: Path) -> None:
    """Put a snapshot back into `state`; a shape mismatch says to delete the checkpoint."""
    try:
        for k, m in state.modules.items():
            load_state_checked(unwrap(m), ckpt[f"model.{k}"], f"{path} ({k})")
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


def _say(message: str) -> None:
    """A diagnostic on stderr that does not break the progress bar (stdout stays clean)."""
    tqdm.write(message, file=sys.stderr)
