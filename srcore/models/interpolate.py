"""Network interpolation between SRResNet and SRGAN: one knob along the perception-distortion
curve (Blau & Michaeli 2018), as ESRGAN and Real-ESRGAN ship it.

SRGAN is fine-tuned from SRResNet, so the two share an architecture and lie close in weight
space: blending every weight and buffer as (1 - alpha) * SRResNet + alpha * SRGAN gives a
generator whose outputs move smoothly from the PSNR-oriented one (alpha 0) to the perceptual
one (alpha 1), with no retraining and at the cost of one network.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class IncompatibleGenerators(ValueError):
    """The two networks cannot be blended (other architecture or spec); the message says why."""


def blend_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * a + alpha * b for every entry, computed as written (not a + alpha (b - a),
    whose alpha = 1 is not exactly b in floating point), so alpha 0 and 1 reproduce a and b bit
    for bit. Integer buffers (BatchNorm's num_batches_tracked) are blended and rounded."""
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if a.keys() != b.keys():
        missing = sorted(a.keys() ^ b.keys())
        raise IncompatibleGenerators(f"the generators differ in key '{missing[0]}'; blend only "
                                     "an SRGAN with the SRResNet it was fine-tuned from")
    out: dict[str, torch.Tensor] = {}
    for key, ta in a.items():
        tb = b[key]
        if ta.shape != tb.shape:
            raise IncompatibleGenerators(f"key '{key}' has shape {tuple(ta.shape)} in one "
                                         f"generator and {tuple(tb.shape)} in the other")
        if ta.is_floating_point():
            out[key] = (1.0 - alpha) * ta + alpha * tb.to(ta.dtype)
        else:
            mixed = (1.0 - alpha) * ta.double() + alpha * tb.double()
            out[key] = mixed.round().to(ta.dtype)
    return out


def blend(srresnet: nn.Module, srgan: nn.Module, alpha: float) -> nn.Module:
    """A new generator with every weight and buffer blended; inputs are left untouched.

    alpha 0 returns a copy of `srresnet`, alpha 1 a copy of `srgan` (exactly, see blend_state).
    The two must be the same network: same class, same spec (blocks, channels, scale, global
    skip), or IncompatibleGenerators names the difference.
    """
    if type(srresnet) is not type(srgan):
        raise IncompatibleGenerators(f"cannot blend a {type(srresnet).__name__} with a "
                                     f"{type(srgan).__name__}")
    for attr in ("scale", "global_skip"):
        if getattr(srresnet, attr, None) != getattr(srgan, attr, None):
            raise IncompatibleGenerators(
                f"'{attr}' is {getattr(srresnet, attr, None)!r} in SRResNet but "
                f"{getattr(srgan, attr, None)!r} in SRGAN")
    out = copy.deepcopy(srresnet)
    out.load_state_dict(blend_state(srresnet.state_dict(), srgan.state_dict(), alpha))
    return out.train(srresnet.training)
