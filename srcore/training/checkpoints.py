"""Weights and resume state on disk: atomic saves, generator files, checkpoints that are
resumed only under the params (and the SRResNet) they were made with.

Every file is read with torch.load(weights_only=True): a foreign or tampered file is refused,
never executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm import tqdm

from srcore.config import Params
from srcore.data.manifest import sha256_file
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
            f"{path}: not a generator weights file: {why_unreadable(err)}; "
            "re-run the stage that makes it (dvc repro)") from None
    model = SRResNet(**spec)
    load_state_checked(model, blob["state_dict"], str(path))
    bad = non_finite_keys(model.state_dict())
    if bad:
        raise DivergedWeights(
            f"{path}: {len(bad)} weight tensor(s) hold NaN or infinity (first: '{bad[0]}'); "
            "the training that wrote it diverged; re-train it (lower the learning rate)")
    return model.eval()


class DivergedWeights(CheckpointMismatch):
    """Generator weights with NaN or infinity: a diverged training's output, never used (an
    SRResNet of NaNs upscales every image to black)."""


def non_finite_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """The keys of floating-point tensors holding NaN or infinity, in state-dict order."""
    return [k for k, v in state.items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def file_digest(path: Path) -> str:
    """Content hash of a file (the SRResNet that a fine-tuning run started from)."""
    return sha256_file(path)[:16]


# ---------------------------------------------------------------------------- checkpoints


def fingerprint(params: Params, stage: str, prepared: Path) -> str:
    """What a checkpoint must share with the current run to be resumed: the values of the
    stage's PARAMS (exactly the keys dvc.yaml lists for it, so logging or checkpoint cadence
    never discards one) and the content of the prepared train and val sets (their manifests),
    so a re-prepared set never resumes old weights on new data."""
    from srcore.data.manifest import content_digest
    from srcore.stages import param_values, params_of

    sets = [prepared / split / spec.name
            for split in ("train", "val") for spec in getattr(params.data, split)]
    relevant = {"stage": stage, "params": param_values(params, params_of(stage)),
                "prepared": content_digest(sets)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def why_unreadable(err: Exception) -> str:
    """Why a weights file cannot be used, in this project's words: PyTorch's own message for
    a refused file advises weights_only=False, i.e. running whatever code the file holds."""
    if isinstance(err, pickle.UnpicklingError):
        return "it holds objects other than tensors, which are never loaded"
    if isinstance(err, KeyError | TypeError):  # loaded, but not the dict this project writes
        return f"it is not one this project wrote ({type(err).__name__}: {err})"
    return f"it is torn or not a PyTorch file ({type(err).__name__})"


def read_checkpoint(path: Path, expected_fingerprint: str, init_digest: str | None = None,
                    precision: str | None = None, *, say: bool = True) -> dict[str, Any] | None:
    """A resumable checkpoint, or None when there is none or it was made with other params.

    `init_digest` (fine-tuning): the hash of the SRResNet the run starts from; a checkpoint
    of a run that started from another SRResNet (pretrain was re-run) is not resumed.
    `precision` (bf16/fp32, what runtime.precision resolved to): a checkpoint trained in the
    other one is not resumed either, so one run never mixes the two. `say=False` reads
    quietly (the session peeks for the run id; the loop, reading it again, says why once).
    """
    if not path.is_file():
        return None
    note = _say if say else (lambda message: None)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a torn or foreign file is simply not resumable
        note(f"ignoring checkpoint {path}: {why_unreadable(err)}; starting over")
        return None
    if not isinstance(ckpt, dict) or ckpt.get("fingerprint") != expected_fingerprint:
        note(f"ignoring checkpoint {path}: it was made with different params")
        return None
    if init_digest is not None and ckpt.get("init_digest") not in (None, init_digest):
        note(f"ignoring checkpoint {path}: it started from another models/srresnet.pt")
        return None
    if precision is not None and ckpt.get("precision") != precision:
        made = ckpt.get("precision")
        if made in ("bf16", "fp32"):
            note(f"ignoring checkpoint {path}: it was trained in {made}, but runtime.precision "
                 f"resolves to {precision} on this machine; starting over")
        else:
            note(f"ignoring checkpoint {path}: it does not record its precision; starting over")
        return None
    return ckpt


def snapshot(state: LoopState, iteration: int, fp: str, run_id: str,
             init_digest: str | None, precision: str | None = None) -> dict[str, Any]:
    """Everything that changes during training, as one torch.save-able dict, and the
    precision (bf16/fp32) it was trained in."""
    blob: dict[str, Any] = {
        "fingerprint": fp, "iteration": iteration, "run_id": run_id,
        "init_digest": init_digest, "precision": precision,
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
