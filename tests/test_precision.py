"""Precision: auto follows the hardware, an explicit setting is obeyed, the choice is said."""

from __future__ import annotations

import pytest
import torch

from srcore import precision


def test_auto_follows_native_bf16_support(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    chosen = precision.resolve("auto", cpu)
    assert chosen.name == "bf16" and chosen.describe() == "bf16 (auto: this CPU runs bf16 natively)"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    chosen = precision.resolve("auto", cpu)
    assert chosen.name == "fp32" and chosen.describe() == "fp32 (auto: this CPU has no native bf16)"


def test_explicit_settings_are_obeyed_and_emulated_bf16_is_called_slow(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve("fp32", torch.device("cpu")).name == "fp32"
    slow = precision.resolve("bf16", torch.device("cpu"))
    assert slow.name == "bf16" and "only emulates it, which is slower than fp32" in slow.why
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve("fp16", torch.device("cpu"))


def test_autocast_runs_bf16_only_when_chosen() -> None:
    cpu = torch.device("cpu")
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.rand(1, 3, 8, 8)
    with precision.Precision("bf16", "bf16", "test").autocast(cpu):
        assert conv(x).dtype == torch.bfloat16
    with precision.Precision("fp32", "fp32", "test").autocast(cpu):
        assert conv(x).dtype == torch.float32
