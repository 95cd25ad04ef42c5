"""Divergence: training stops at the first non-finite loss or weight, before anything is kept.

The losses are checked every step (they are floats already: free), the weights (and EMA and
BatchNorm statistics) at every log, validation and checkpoint point and after the last step
(one pass over the state dicts). A diverged state is never checkpointed, saved, logged or
registered: `Diverged` leaves the stage with one line naming the step, the value and the knob
to turn, and the CLI exits 2 with the previous good outputs untouched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import nn

from srcore.config import Params
from srcore.training.checkpoints import non_finite_keys


class Diverged(RuntimeError):
    """Training met a non-finite loss, weight or validation score; the message says where."""


def fix(stage: str, params: Params) -> str:
    """What to change in params.yaml: the learning rate (and, fine-tuning, the adversarial
    weight), with its current value."""
    cfg = getattr(params, stage)
    advice = f"lower {stage}.lr (now {cfg.lr:g})"
    if stage == "finetune":
        advice += f" or finetune.adv_weight (now {params.finetune.adv_weight:g})"
    return f"{advice} and re-run; nothing was saved or registered"


def _diverged(stage: str, it: int, what: str, params: Params) -> Diverged:
    return Diverged(f"{stage} diverged at step {it}: {what}; {fix(stage, params)}")


def check_values(stage: str, it: int, values: Mapping[str, float], params: Params) -> None:
    """Losses (every step) or validation scores: the first non-finite one stops training."""
    for key, value in values.items():
        if not math.isfinite(value):
            raise _diverged(stage, it, f"{key} is {value}", params)


def first_non_finite(modules: Mapping[str, nn.Module]) -> tuple[str, int] | None:
    """('module.key', how many tensors are non-finite) of the first non-finite floating-point
    tensor in the modules' state dicts (parameters and buffers), or None when all are finite."""
    first, count = None, 0
    for name, module in modules.items():
        bad = non_finite_keys(module.state_dict())
        if bad:
            first = first or f"{name}.{bad[0]}"
            count += len(bad)
    return None if first is None else (first, count)


def check_weights(stage: str, it: int, modules: Mapping[str, nn.Module],
                  params: Params) -> None:
    """Every weight and buffer finite, or Diverged naming the first bad tensor."""
    bad = first_non_finite(modules)
    if bad is not None:
        where, count = bad
        more = f" (and {count - 1} more tensor(s))" if count > 1 else ""
        raise _diverged(stage, it, f"weight '{where}' is not finite{more}", params)
