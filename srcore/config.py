"""Typed view of params.yaml, validated once at the edge.

Every field is required and unknown keys are refused: params.yaml is the only place a default
lives (architecture rule 3), so a second default in code could silently drift from it.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Beta = Annotated[float, Field(ge=0, lt=1)]


class ConfigError(ValueError):
    """A user-fixable problem in params.yaml; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class DatasetSpec(_Strict):
    """A dataset: a registry name, or a name plus an http(s)://, file:// URL or a local path."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    url: str | None = None
    sha256: str | None = None


#: The three kinds of data, never mixed: train is trained on, val chooses (in-training
#: validation, checkpoints, the registry gate, any tuning), test is only reported.
SPLITS = ("train", "val", "test")


class DataConfig(_Strict):
    train: Annotated[list[DatasetSpec], Field(min_length=1)]
    val: Annotated[list[DatasetSpec], Field(min_length=1)]
    test: Annotated[list[DatasetSpec], Field(min_length=1)]

    @field_validator("train", "val", "test", mode="before")
    @classmethod
    def _names_to_specs(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _splits_are_disjoint(self) -> DataConfig:
        """A set named twice would be trained on and then chosen or reported on: refused."""
        seen: dict[str, str] = {}
        for split in SPLITS:
            for spec in getattr(self, split):
                if spec.name in seen:
                    where = (f"twice in data.{split}" if seen[spec.name] == split
                             else f"in both data.{seen[spec.name]} and data.{split}")
                    raise ValueError(f"dataset '{spec.name}' is named {where}; a set belongs "
                                     "to one of train, val and test")
                seen[spec.name] = split
        return self

    @property
    def all_sets(self) -> list[DatasetSpec]:
        """Every configured set once: train, then val, then test."""
        return [*self.train, *self.val, *self.test]

    @property
    def scored_sets(self) -> list[DatasetSpec]:
        """What evaluation scores: val (the gate reads it) and test (only reported)."""
        return [*self.val, *self.test]

    def split_of(self, name: str) -> str:
        """'train', 'val' or 'test' for a configured set name."""
        for split in SPLITS:
            if any(spec.name == name for spec in getattr(self, split)):
                return split
        raise KeyError(name)


class DownloadConfig(_Strict):
    retries: NonNegInt
    timeout_s: PositiveFloat


class PrepareConfig(_Strict):
    gaussian_sigma: PositiveFloat | None
    min_hr_side: PositiveInt
    shard_mb: PositiveFloat


class ModelConfig(_Strict):
    blocks: PositiveInt
    channels: PositiveInt
    global_skip: bool


class _TrainCommon(_Strict):
    iterations: PositiveInt
    batch_size: PositiveInt
    hr_crop: PositiveInt
    lr: PositiveFloat
    beta1: Beta
    beta2: Beta
    augment: bool
    sampling: Literal["pixel", "image"]
    min_crop_std: NonNegFloat  # redraw HR crops flatter than this (0-255 scale); 0 = off
    # Beyond the paper: the stage's G (and its BN statistics) is an exponential moving average
    # of its weights with this decay; null = the last weights, as the paper.
    ema_decay: Annotated[float, Field(gt=0, lt=1)] | None
    log_every: PositiveInt
    val_every: PositiveInt
    checkpoint_every: PositiveInt


class PretrainConfig(_TrainCommon):
    lr_schedule: Literal["constant", "cosine"]


class FinetuneConfig(_TrainCommon):
    lr_second_half: PositiveFloat
    content_loss: Literal["mse", "vgg22", "vgg54"]
    adv_weight: Annotated[float, Field(ge=0)]
    d_steps: PositiveInt
    d_channels: PositiveInt

    @field_validator("hr_crop")
    @classmethod
    def _crop_fits_discriminator(cls, value: int) -> int:
        if value % 16:
            raise ValueError(f"{value} is not a multiple of 16, which the discriminator's four "
                             "stride-2 layers need")
        return value


class RuntimeConfig(_Strict):
    device: Literal["auto", "cpu", "cuda"]
    num_workers: NonNegInt
    channels_last: bool
    # bf16 autocast or fp32 (srcore.precision): auto = bf16 where the device runs it natively
    precision: Literal["auto", "bf16", "fp32"]
    compile: bool
    deterministic: bool
    # Data-parallel training when launched by torchrun (srcore/training/distributed.py); the global
    # batch stays pretrain/finetune.batch_size, split evenly over the processes.
    distributed: bool


Alpha = Annotated[float, Field(gt=0, lt=1)]


class EvaluateConfig(_Strict):
    crop_border: NonNegInt
    tile: NonNegInt
    tile_overlap: NonNegInt
    grid_images: NonNegInt
    # Blends (1 - a) SRResNet + a SRGAN scored between the two (the perception-distortion
    # curve); 0 and 1 are the models themselves, always scored.
    alphas: Annotated[list[Alpha], Field(max_length=16)]

    @field_validator("alphas")
    @classmethod
    def _distinct(cls, value: list[float]) -> list[float]:
        if len(set(value)) != len(value):
            raise ValueError(f"{value} names an alpha twice")
        return value


class TrackingConfig(_Strict):
    experiment: Annotated[str, Field(min_length=1)]
    register_models: bool
    ui_url: Annotated[str, Field(pattern=r"^https?://")]
    # Promotion gate (srcore.tracking.gate): the validation set it compares on (None = the
    # first of data.val; never a test set) and SRGAN's metric; SRResNet, trained for MSE, is
    # always gated on psnr_y.
    gate_set: Annotated[str, Field(min_length=1)] | None
    gate_metric_srgan: Literal["niqe", "psnr_y", "ssim_y", "ssim_daala_y"]
    # SRGAN may trade PSNR for naturalness, but only this far below the @champion SRResNet
    # on the gate set (the paper's Set5 gap is 2.65 dB), and never below bicubic.
    gate_psnr_budget_db: NonNegFloat
    # The point on the perception-distortion curve a registered srgan serves when a request
    # does not ask for one: (1 - a) SRResNet + a SRGAN, 1 = SRGAN itself.
    serve_alpha: Annotated[float, Field(ge=0, le=1)]
    # SRGAN's gate judges by mean opinion score instead of gate_metric_srgan when every
    # compared version has at least this many ratings on the gate set (srcore.rating).
    gate_min_ratings: PositiveInt


class RatingConfig(_Strict):
    """`srgan rate` (the blind MOS page): calibration pairs shown first (validation images,
    never rated), and the share of versions shown twice for test-retest agreement."""

    calibration_images: PositiveInt
    repeat_fraction: Annotated[float, Field(ge=0, le=1)]


class Params(_Strict):
    seed: NonNegInt
    # SRResNet upsamples with x2 sub-pixel blocks, so only powers of two can be trained.
    scale: Literal[2, 4, 8]
    data: DataConfig
    download: DownloadConfig
    prepare: PrepareConfig
    model: ModelConfig
    pretrain: PretrainConfig
    finetune: FinetuneConfig
    runtime: RuntimeConfig
    evaluate: EvaluateConfig
    tracking: TrackingConfig
    rating: RatingConfig

    @field_validator("pretrain", "finetune")
    @classmethod
    def _crop_fits_scale(cls, value: _TrainCommon, info: Any) -> _TrainCommon:
        scale = info.data.get("scale")
        if scale and value.hr_crop % scale:
            raise ValueError(f"hr_crop={value.hr_crop} is not a multiple of scale={scale}")
        return value

    @field_validator("tracking")
    @classmethod
    def _gate_set_is_a_val_set(cls, value: TrackingConfig, info: Any) -> TrackingConfig:
        data = info.data.get("data")
        if data is not None and value.gate_set is not None:
            names = [s.name for s in data.val]
            if value.gate_set not in names:
                raise ValueError(f"gate_set '{value.gate_set}' is not one of the validation "
                                 f"sets {names} (data.val); the gate never reads a test set")
        return value


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<top level>"
    kind = first["type"]
    if kind == "missing":
        what = "is missing"
    elif kind == "extra_forbidden":
        what = "is not a known key (typo?)"
    else:
        got = first.get("input")
        # A rule about a whole section explains itself; echoing the section would bury it.
        shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
        what = f"is invalid: {first['msg'].removeprefix('Value error, ')}{shown}"
    more = f" (+{err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
    return f"{source}: key '{key}' {what}{more}"


def parse(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a loaded params mapping, raising ConfigError naming the first bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load(path: str | os.PathLike[str] = "params.yaml") -> Params:
    """Read and validate params.yaml; every error names the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; run from the project root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse(raw, str(path))


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Overlay wins key by key; nested mappings merge, lists and scalars replace."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_into(doc: Any, overlay: dict[str, Any]) -> None:
    """deep_merge on a ruamel round-trip document, so params.yaml keeps its comments."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            _merge_into(doc[key], value)
        else:
            doc[key] = copy.deepcopy(value)


def apply_overlay(params_path: Path, overlay_path: Path) -> Params:
    """Merge an overlay (e.g. configs/paper.yaml) into params.yaml in place, after validating.

    Rewriting params.yaml rather than reading two files keeps it the single source of truth
    that dvc.yaml tracks, so `dvc repro` and the Prefect flow see the same recipe. A refused
    overlay leaves params.yaml untouched.
    """
    from ruamel.yaml import YAML

    base = yaml.safe_load(params_path.read_text())
    overlay = yaml.safe_load(overlay_path.read_text()) or {}
    if not isinstance(overlay, dict):
        raise ConfigError(f"{overlay_path}: expected a mapping at the top level")
    params = parse(deep_merge(base, overlay), f"{params_path} + {overlay_path}")
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(params_path.read_text())
    _merge_into(doc, overlay)
    tmp = params_path.with_name(params_path.name + ".tmp")
    with tmp.open("w") as fh:
        rt.dump(doc, fh)
    os.replace(tmp, params_path)
    return params


def as_flat_dict(params: Params) -> dict[str, Any]:
    """Dotted keys for MLflow params."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = value

    walk("", params.model_dump(mode="json"))
    return flat
