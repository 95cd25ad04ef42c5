"""The pipeline's stages, one module each, in the order dvc.yaml runs them.

Each module reads top to bottom: what the stage makes and why, then `run(params, layout)`
reading its params, its inputs, doing the work and writing its outputs. A module is imported
when its stage runs, not here, so that `srgan --help` does not pay for torch.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any

#: `srgan <stage>` (and dvc.yaml's stage) -> the module under srcore.stages whose run() it is.
STAGES: dict[str, str] = {
    "download": "download",
    "check-data": "check_data",
    "prepare": "prepare",
    "pretrain": "pretrain",
    "finetune": "finetune",
    "evaluate": "evaluate",
}


class UserError(Exception):
    """Raised for problems the user can fix; printed as one line without a traceback."""


def run_function(stage: str) -> Callable[..., None]:
    """The stage's `run(params, layout, **options)`, importing its module now."""
    module: Any = import_module(f"{__name__}.{STAGES[stage]}")
    return module.run
