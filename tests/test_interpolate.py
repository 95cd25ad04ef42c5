"""Network interpolation: alpha 0 and 1 are the two generators exactly, 0.5 the hand blend."""

from __future__ import annotations

import pytest
import torch

from srcore.models.interpolate import IncompatibleGenerators, blend, blend_state
from srcore.models.srresnet import SRResNet


def _two_generators() -> tuple[SRResNet, SRResNet]:
    torch.manual_seed(0)
    a = SRResNet(blocks=2, channels=8, scale=4, global_skip=True)
    b = SRResNet(blocks=2, channels=8, scale=4, global_skip=True)
    with torch.no_grad():  # give BatchNorm different statistics too, as training would
        for net, shift in ((a, 0.3), (b, -0.2)):
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.add_(shift)
                    m.running_var.mul_(1 + shift)
                    m.num_batches_tracked.fill_(10 if shift > 0 else 13)
    return a.eval(), b.eval()


def test_alpha_0_and_1_reproduce_the_two_generators_exactly() -> None:
    a, b = _two_generators()
    x = torch.rand(2, 3, 12, 10)
    with torch.no_grad():
        assert torch.equal(blend(a, b, 0.0)(x), a(x))
        assert torch.equal(blend(a, b, 1.0)(x), b(x))
        assert not torch.equal(blend(a, b, 0.5)(x), a(x))


def test_half_blend_equals_the_hand_blended_weights_and_buffers() -> None:
    a, b = _two_generators()
    mixed = blend(a, b, 0.5).state_dict()
    sa, sb = a.state_dict(), b.state_dict()
    for key, value in sa.items():
        if value.is_floating_point():
            assert torch.equal(mixed[key], 0.5 * value + 0.5 * sb[key]), key
    bn = "body.0.body.1"
    assert torch.equal(mixed[f"{bn}.running_var"],
                       0.5 * sa[f"{bn}.running_var"] + 0.5 * sb[f"{bn}.running_var"])
    assert mixed[f"{bn}.num_batches_tracked"].item() == 12  # round(11.5): blended, rounded
    assert mixed[f"{bn}.num_batches_tracked"].dtype == torch.int64
    # The inputs are not modified.
    assert torch.equal(a.state_dict()["head.0.weight"], sa["head.0.weight"])


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), "0.5"])
def test_alpha_outside_0_1_is_refused(alpha: object) -> None:
    a, b = _two_generators()
    with pytest.raises(ValueError, match="alpha must be a number in"):
        blend(a, b, alpha)  # type: ignore[arg-type]


def test_generators_of_another_shape_or_spec_are_refused() -> None:
    a, _ = _two_generators()
    wider = SRResNet(blocks=2, channels=16, scale=4, global_skip=True)
    with pytest.raises(IncompatibleGenerators, match="has shape"):
        blend(a, wider, 0.5)
    deeper = SRResNet(blocks=3, channels=8, scale=4, global_skip=True)
    with pytest.raises(IncompatibleGenerators, match="differ in key 'body.2"):
        blend_state(a.state_dict(), deeper.state_dict(), 0.5)
    no_skip = SRResNet(blocks=2, channels=8, scale=4, global_skip=False)
    with pytest.raises(IncompatibleGenerators, match="'global_skip' is True in SRResNet"):
        blend(a, no_skip, 0.5)
