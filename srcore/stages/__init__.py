"""The pipeline's stages, one module each, in the order dvc.yaml runs them.

Each module reads top to bottom: what the stage makes and why, then `run(params, layout)`
reading its params, its inputs, doing the work and writing its outputs. A module is imported
when its stage runs, not here, so that `srgan --help` does not pay for torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from importlib import import_module
from typing import Any

#: `srgan <stage>` (and dvc.yaml's stage) -> the module under srcore.stages whose run() it is.
STAGES: dict[str, str] = {
    "download": "download",
    "check-data": "check_data",
    "hash-data": "hash_data",
    "prepare": "prepare",
    "pretrain": "pretrain",
    "finetune": "finetune",
    "evaluate": "evaluate",
}


class UserError(Exception):
    """Raised for problems the user can fix; printed as one line without a traceback."""


#: params.yaml keys that change no stage's result, so dvc.yaml lists none of them and no
#: checkpoint fingerprint hashes them: how hard to try, how often to log, validate and
#: checkpoint (a resumed run is bit-identical), how many loader processes (a batch is a pure
#: function of its iteration), and where results are shown or registered. Every other key is
#: in the PARAMS of the stage(s) whose result it changes (tests/test_dvc_deps.py checks both).
NO_RESULT: tuple[str, ...] = (
    "download.retries", "download.timeout_s",
    "pretrain.log_every", "pretrain.val_every", "pretrain.checkpoint_every",
    "finetune.log_every", "finetune.val_every", "finetune.checkpoint_every",
    "runtime.num_workers",
    "tracking.experiment", "tracking.register_models", "tracking.ui_url",
    "tracking.serve_alpha",
    "rating.calibration_images", "rating.repeat_fraction",  # what `srgan rate` shows
)


def params_of(stage: str) -> tuple[str, ...]:
    """The params keys a stage's result depends on: its module's PARAMS (dvc.yaml's params)."""
    module: Any = import_module(f"{__name__}.{STAGES[stage]}")
    return tuple(module.PARAMS)


def param_values(params: Any, keys: Iterable[str]) -> dict[str, Any]:
    """{dotted key: value} of `keys` in validated params (JSON types), e.g. for a hash."""
    dumped = params.model_dump(mode="json")
    out = {}
    for key in keys:
        value = dumped
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out


def run_function(stage: str) -> Callable[..., None]:
    """The stage's `run(params, layout, **options)`, importing its module now."""
    module: Any = import_module(f"{__name__}.{STAGES[stage]}")
    return module.run
