"""SRResNet and the discriminator against the paper's figure 4: sizes, layers, shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from srcore.models.discriminator import LAYER_PLAN, Discriminator
from srcore.models.srresnet import (
    NarrowOutputConv2d,
    SRResNet,
    build_generator,
    generator_spec,
)

#: B=16, 64 channels, x4, PReLU with one slope each ("about 1.55 M" in the paper).
PAPER_SRRESNET_PARAMS = 1_549_462


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_srresnet_has_the_papers_parameter_count() -> None:
    assert _count(SRResNet(blocks=16, channels=64, scale=4)) == PAPER_SRRESNET_PARAMS
    # global_skip adds a bicubic path, no weights
    assert _count(SRResNet(16, 64, 4, global_skip=True)) == PAPER_SRRESNET_PARAMS


def test_srresnet_layer_plan() -> None:
    g = SRResNet(blocks=16, channels=64, scale=4)
    head = g.head[0]
    assert (head.in_channels, head.out_channels, head.kernel_size) == (3, 64, (9, 9))
    assert isinstance(g.head[1], nn.PReLU)
    assert len(g.body) == 16
    for block in g.body:
        kinds = [type(m) for m in block.body]
        assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.PReLU, nn.Conv2d, nn.BatchNorm2d]
    assert len(g.upsample) == 2  # two x2 sub-pixel blocks for x4
    for up in g.upsample:
        assert up.conv.out_channels == 256 and up.shuffle.upscale_factor == 2
    assert (g.tail.in_channels, g.tail.out_channels, g.tail.kernel_size) == (64, 3, (9, 9))


@pytest.mark.parametrize("size", [(7, 11), (16, 16)])
def test_srresnet_is_fully_convolutional(size: tuple[int, int]) -> None:
    g = SRResNet(blocks=2, channels=8, scale=4).eval()
    with torch.no_grad():
        out = g(torch.rand(2, 3, *size))
    assert out.shape == (2, 3, size[0] * 4, size[1] * 4)


def test_global_skip_adds_bicubic_mapped_to_minus_one_one() -> None:
    torch.manual_seed(0)
    plain = SRResNet(blocks=1, channels=8, scale=4, global_skip=False).eval()
    skip = SRResNet(blocks=1, channels=8, scale=4, global_skip=True).eval()
    skip.load_state_dict(plain.state_dict())
    lr = torch.rand(1, 3, 10, 12)
    with torch.no_grad():
        bicubic = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False) * 2 - 1
        assert not torch.allclose(plain(lr), skip(lr))
        torch.testing.assert_close(skip(lr), plain(lr) + bicubic)
        nn.init.zeros_(skip.tail.weight)
        nn.init.zeros_(skip.tail.bias)
        torch.testing.assert_close(skip(lr), bicubic, rtol=0, atol=0)


def test_generator_spec_rebuilds_the_same_network() -> None:
    class Cfg:
        blocks, channels, global_skip = 3, 8, True

    g = build_generator(Cfg(), 2)
    assert generator_spec(g) == {"blocks": 3, "channels": 8, "scale": 2, "global_skip": True}
    SRResNet(**generator_spec(g)).load_state_dict(g.state_dict())
    with pytest.raises(ValueError, match="scale=3"):
        SRResNet(scale=3)


def test_discriminator_layer_plan_for_96x96() -> None:
    d = Discriminator(hr_size=96, base_channels=64)
    convs = [m for m in d.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert [c.stride[0] for c in convs] == [1, 2, 1, 2, 1, 2, 1, 2]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert [(c.out_channels, c.stride[0]) for c in convs] == list(LAYER_PLAN)
    # after each conv: BN on all but the first, then LeakyReLU(0.2); no pooling anywhere
    seq = list(d.features)
    starts = [i for i, m in enumerate(seq) if isinstance(m, nn.Conv2d)]
    for n, i in enumerate(starts):
        after = seq[i + 1:(starts[n + 1] if n + 1 < len(starts) else len(seq))]
        want = [nn.LeakyReLU] if n == 0 else [nn.BatchNorm2d, nn.LeakyReLU]
        assert [type(m) for m in after] == want, n
    relus = [m for m in d.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(relus) == 9 and all(m.negative_slope == 0.2 for m in relus)
    assert not any(isinstance(m, nn.MaxPool2d | nn.AvgPool2d) for m in d.modules())
    dense = [m for m in d.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in dense] == [(6 * 6 * 512, 1024), (1024, 1)]
    assert not any(isinstance(m, nn.Sigmoid) for m in d.modules())  # logits; sigmoid in loss


def test_discriminator_shapes() -> None:
    d = Discriminator(96, 64).eval()
    x = torch.rand(2, 3, 96, 96) * 2 - 1
    with torch.no_grad():
        assert d.features(x).shape == (2, 512, 6, 6)
        assert d(x).shape == (2,)
    small = Discriminator(32, 8).eval()
    with torch.no_grad():
        assert small.features(torch.rand(1, 3, 32, 32)).shape == (1, 64, 2, 2)
    with pytest.raises(ValueError, match="multiple of 16"):
        Discriminator(40)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_narrow_output_conv_is_an_ordinary_conv(fmt: torch.memory_format) -> None:
    """The tail's CPU fast path (a transposed convolution) computes nn.Conv2d's function."""
    torch.manual_seed(0)
    fast = NarrowOutputConv2d(16, 3, 9, padding=4).to(memory_format=fmt)
    plain = nn.Conv2d(16, 3, 9, padding=4)
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 16, 11, 13).contiguous(memory_format=fmt).requires_grad_()
    y_fast, y_plain = fast(x), plain(x)
    torch.testing.assert_close(y_fast, y_plain, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y_plain)
    grads_fast = torch.autograd.grad(y_fast, [x, *fast.parameters()], g)
    grads_plain = torch.autograd.grad(y_plain, [x, *plain.parameters()], g)
    for a, b in zip(grads_fast, grads_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert list(fast.state_dict()) == ["weight", "bias"]
