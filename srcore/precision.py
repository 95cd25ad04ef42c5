"""Which arithmetic a stage or an inference runs in, chosen once, said and recorded.

bf16 autocast runs SRResNet 2.2-2.7x faster than fp32 on a CPU with native bf16 (AVX512-BF16 or
AMX; measured in benchmarks/train_throughput.py and benchmarks/upscale.py) and on CUDA, and
changes PSNR-Y by about a thousandth of a dB; elsewhere bf16 is emulated and slower than fp32.
So `auto` picks bf16 where the hardware runs it natively and fp32 elsewhere. Because the same
params then give different numbers on different machines, the choice is never silent: every
caller records `Precision.describe()` (MLflow params, registered-version tags, checkpoints).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch

Setting = Literal["auto", "bf16", "fp32"]
SETTINGS: tuple[str, ...] = ("auto", "bf16", "fp32")


def cpu_has_native_bf16() -> bool:
    """oneDNN runs bf16 natively (AVX512-BF16 / AMX); elsewhere it is emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and cpu_has_native_bf16()


@dataclass(frozen=True)
class Precision:
    """The resolved choice: `name` is what runs, `why` says how it was chosen."""

    name: Literal["bf16", "fp32"]
    setting: str
    why: str

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def describe(self) -> str:
        """e.g. 'bf16 (auto: this CPU runs bf16 natively)', for logs, tags and checkpoints."""
        return f"{self.name} ({self.setting}: {self.why})"

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast when bf16 was chosen; a no-op context for fp32."""
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                              enabled=self.bf16)


def resolve(setting: str, device: torch.device) -> Precision:
    """`auto` -> bf16 where the device runs it natively, else fp32; `bf16` / `fp32` as asked
    (bf16 on hardware that only emulates it is allowed, and said to be slow)."""
    if setting not in SETTINGS:
        raise ValueError(f"precision must be one of {SETTINGS}, got {setting!r}")
    native = _native_bf16(device)
    where = "this GPU" if device.type == "cuda" else "this CPU"
    if setting == "fp32":
        return Precision("fp32", setting, "asked for; bit-exact across machines")
    if setting == "bf16":
        return Precision("bf16", setting, f"asked for; {where} runs it natively" if native
                         else f"asked for; {where} only emulates it, which is slower than fp32")
    if native:
        return Precision("bf16", setting, f"{where} runs bf16 natively")
    return Precision("fp32", setting, f"{where} has no native bf16")
