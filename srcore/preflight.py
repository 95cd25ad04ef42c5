"""Everything that params.yaml and the dataset registry can tell before the first second of work.

config.py refuses what one file can refuse on its own (types, unknown keys, scale 3, crops the
discriminator cannot take, a gate set outside data.val). This adds what needs the world beside
it: dataset names the registry knows and local sources that exist (relative to the project
root), the VGG19 weights a VGG content loss needs, the batch sizes against torchrun's world size,
and a prepared/ made at the configured scale. `srgan <stage>` and the Prefect flow both call
`check` first, so a typo in data.test stops `download` before it fetches anything, and a
missing VGG19 file stops the flow before pretraining, not after it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from srcore.config import SPLITS, ConfigError, Params

#: Stages that train (read prepared/ train and val sets, honour torchrun's world size).
TRAINING = ("pretrain", "finetune")


class PreflightError(ConfigError):
    """params.yaml asks for something the project root, the registry or the machine cannot
    give; the message names the params file, the key and the fix."""


def check(params: Params, source: str | os.PathLike[str], root: Path,
          stages: Iterable[str]) -> None:
    """Raise PreflightError for the first thing that would stop `stages` later.

    `source` is the params file as the user named it (--params), for the messages; `stages`
    what this invocation runs: one stage for `srgan <stage>`, every stage for the flow.
    """
    run = set(stages)
    where = str(source)
    if "download" in run:  # the later stages read data/, however it got there (dvc pull)
        datasets(params, where, root)
    if "finetune" in run:
        vgg_weights(params, where)
    if run & set(TRAINING):
        world_size(params, where, run & set(TRAINING))
    if "prepare" not in run:
        reads = {split for stage in run for split in _reads(stage)}
        prepared_scale(params, where, root, reads)


# ------------------------------------------------------------------------------- datasets


def datasets(params: Params, where: str, root: Path) -> None:
    """Every configured set can be fetched: a registry name, or a URL of which a local one
    exists (relative paths resolve against the project root, as `srgan download` does)."""
    from srcore.data.sources import REGISTRY, _local_path

    for split in SPLITS:
        for spec in getattr(params.data, split):
            if spec.url is None:
                if spec.name not in REGISTRY:
                    raise PreflightError(
                        f"{where}: dataset '{spec.name}' in data.{split} is not in the dataset "
                        f"registry ({', '.join(sorted(REGISTRY))}); fix the name, or give it "
                        "a url: (http(s)://, file:// or a local path)")
                continue
            local = _local_path(spec.url, Path(os.path.abspath(root)))
            if local is not None and not local.exists():
                raise PreflightError(
                    f"{where}: dataset '{spec.name}' in data.{split}: {local} does not exist "
                    "(a relative url: is read from the project root); fix its url:")


# -------------------------------------------------------------------------------- VGG19


def vgg_weights(params: Params, where: str) -> None:
    """A VGG content loss needs torchvision's VGG19 weights: cached, or fetchable (fetching
    is on). Whether the host answers is the stage's to find: it fetches before training."""
    if params.finetune.content_loss == "mse":
        return
    from srcore.models import vgg

    url = vgg.vgg19_url()
    cached = vgg.weights_path(url)
    if cached.is_file():
        return
    advice = (f"put {vgg.VGG19_URL} there (or set TORCH_HOME), or set finetune.content_loss: "
              f"mse in {where}")
    if url is None:
        raise PreflightError(
            f"{where}: finetune.content_loss is {params.finetune.content_loss}, but the VGG19 "
            f"ImageNet weights are not at {cached} and fetching is off ({vgg.URL_ENV} is "
            f"empty); {advice}")


# ------------------------------------------------------------------------- torchrun's world


def world_size(params: Params, where: str, stages: Iterable[str]) -> None:
    """Under torchrun: runtime.distributed on, and each global batch divisible by the world."""
    size = _launched_world_size()
    if size is None or size == 1:
        return
    if not params.runtime.distributed:
        raise PreflightError(
            f"{where}: this is one of {size} processes started by torchrun, but key "
            "'runtime.distributed' is false; set it to true, or run `srgan <stage>` without "
            "torchrun")
    for stage in sorted(stages):
        batch = getattr(params, stage).batch_size
        if batch % size:
            raise PreflightError(
                f"{where}: key '{stage}.batch_size' is {batch}, which does not split evenly "
                f"over {size} processes (WORLD_SIZE); make it a multiple of {size} or change "
                "the number of processes")


def _launched_world_size() -> int | None:
    """WORLD_SIZE set by torchrun (as srcore.training.distributed reads it, without torch)."""
    value = os.environ.get("WORLD_SIZE")
    if not value or "RANK" not in os.environ:
        return None
    try:
        return int(value)
    except ValueError:
        return None


# ------------------------------------------------------------------------------ prepared/


def _reads(stage: str) -> tuple[str, ...]:
    """The splits of prepared/ a stage reads."""
    if stage in TRAINING:
        return ("train", "val")
    if stage == "evaluate":
        return ("val", "test")
    return ()


def _manifest_scale(root: Path, split: str, name: str) -> int | None:
    for folder in (root / "prepared" / split / name, root / "prepared" / name):
        try:
            scale = json.loads((folder / "manifest.json").read_text()).get("scale")
        except (OSError, ValueError, AttributeError):
            continue
        return scale if isinstance(scale, int) else None
    return None


def prepared_scale(params: Params, where: str, root: Path, splits: Iterable[str]) -> None:
    """A prepared set made at another scale would train on misaligned crops: refuse it before
    loading anything (a missing set is the stage's own, more specific, message)."""
    for split in SPLITS:
        if split not in splits:
            continue
        for spec in getattr(params.data, split):
            made = _manifest_scale(root, split, spec.name)
            if made is not None and made != params.scale:
                raise PreflightError(
                    f"{where}: key 'scale' is {params.scale}, but prepared set '{spec.name}' "
                    f"was made at scale {made}; run `srgan prepare` (or `dvc repro`) first")
