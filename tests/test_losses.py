"""VGG content loss (layers, normalisation, scale, frozen, loading) and adversarial losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from srcore.losses import ContentLoss, discriminator_loss, generator_adversarial_loss
from srcore.models import vgg
from srcore.models.vgg import VGGFeatures, VGGWeightsMissing, load_vgg19_state_dict, weights_path


@pytest.fixture(scope="module")
def tv_vgg() -> nn.Module:
    """A random-init torchvision VGG19: the reference for layer indices and state-dict keys."""
    torch.manual_seed(0)
    return torchvision.models.vgg19(weights=None).eval()


@pytest.fixture(scope="module")
def tv_features_state(tv_vgg: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tv_vgg.state_dict().items() if k.startswith("features.")}


def test_url_and_cache_name_are_torchvisions() -> None:
    url = torchvision.models.VGG19_Weights.IMAGENET1K_V1.url
    assert url == vgg.VGG19_URL
    assert weights_path().name == Path(url).name == "vgg19-dcbb9e9d.pth"


@pytest.mark.parametrize(("layer", "end", "last_conv"), [("vgg22", 9, 7), ("vgg54", 36, 34)])
def test_phi_is_after_the_relu(tv_vgg: nn.Module, tv_features_state, layer: str, end: int,
                               last_conv: int) -> None:
    net = VGGFeatures(layer, tv_features_state)
    assert len(net.features) == end and isinstance(net.features[-1], nn.ReLU)
    assert isinstance(net.features[last_conv], nn.Conv2d)
    assert net.features[last_conv].out_channels == (128 if layer == "vgg22" else 512)
    assert not any(isinstance(m, nn.MaxPool2d) for m in list(net.features)[-2:])
    # same modules, same weights, same output as torchvision's features[:end]
    x = torch.rand(1, 3, 32, 32) * 2 - 1  # [-1, 1], the generator's range
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = tv_vgg.features[:end](((x + 1) / 2 - mean) / std) / 12.75
        got = net(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got >= 0).all()  # after a ReLU


def test_vgg_is_frozen_and_stays_in_eval(tv_features_state) -> None:
    loss = ContentLoss("vgg22", tv_features_state)
    parent = nn.ModuleDict({"g": nn.Conv2d(3, 3, 1), "content": loss})
    parent.train()
    assert parent["g"].training
    assert not loss.vgg.training and not any(m.training for m in loss.vgg.modules())
    assert not any(p.requires_grad for p in loss.parameters())
    sr = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_()
    value = loss(sr, torch.rand(2, 3, 16, 16) * 2 - 1)
    value.backward()
    assert sr.grad is not None and sr.grad.abs().sum() > 0  # gradients reach G's output
    assert all(p.grad is None for p in loss.parameters())


def test_content_loss_mse_is_pixel_mse() -> None:
    sr, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    assert ContentLoss("mse").vgg is None
    torch.testing.assert_close(ContentLoss("mse")(sr, hr), F.mse_loss(sr, hr))
    with pytest.raises(ValueError, match="unknown VGG layer"):
        ContentLoss("vgg33")


def test_loader_reads_torch_home_cache(tmp_path: Path, monkeypatch, tv_vgg: nn.Module) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = tmp_path / "hub" / "checkpoints" / Path(vgg.VGG19_URL).name
    assert weights_path() == path
    path.parent.mkdir(parents=True)
    state = tv_vgg.state_dict()  # the whole model, classifier included, as torchvision ships
    torch.save(state, path)
    loaded = load_vgg19_state_dict()
    assert loaded.keys() == state.keys()
    net = VGGFeatures("vgg22")  # no state dict given: read from the cache
    torch.testing.assert_close(net.features[7].weight, state["features.7.weight"])
    # the file torchvision actually ships is in the legacy format, which cannot be mmapped
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    torch.save(features, path, _use_new_zipfile_serialization=False)
    torch.testing.assert_close(load_vgg19_state_dict()["features.34.bias"],
                               state["features.34.bias"])


def test_loader_explains_a_missing_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(VGGWeightsMissing) as err:
        ContentLoss("vgg54")
    msg = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth") in msg
    assert vgg.VGG19_URL in msg and "content_loss: mse" in msg


def test_loader_refuses_a_wrong_or_unsafe_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = weights_path()
    path.parent.mkdir(parents=True)
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(VGGWeightsMissing, match="features.0.weight"):
        VGGFeatures("vgg22")
    torch.save({"code": nn.ReLU()}, path)  # a pickled module: refused by weights_only=True
    with pytest.raises(VGGWeightsMissing, match="cannot be read"):
        load_vgg19_state_dict()


def test_adversarial_loss_is_minus_log_sigmoid() -> None:
    logits = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0], dtype=torch.float64)
    for i in range(len(logits)):
        one = logits[i:i + 1]
        want = -torch.log(torch.sigmoid(one))
        torch.testing.assert_close(generator_adversarial_loss(one), want.mean())
    torch.testing.assert_close(generator_adversarial_loss(logits),
                               (-torch.log(torch.sigmoid(logits))).mean())
    real, fake = discriminator_loss(logits, logits)
    torch.testing.assert_close(real, (-torch.log(torch.sigmoid(logits))).mean())
    torch.testing.assert_close(fake, (-torch.log(1 - torch.sigmoid(logits))).mean())


def test_adversarial_loss_is_stable_for_large_logits() -> None:
    logits = torch.tensor([-1000.0, -120.0, 120.0, 1000.0], requires_grad=True)
    assert torch.isinf(-torch.log(torch.sigmoid(logits.detach()[:1]))).all()  # naive form
    loss = generator_adversarial_loss(logits)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(loss, torch.tensor((1000.0 + 120.0) / 4), rtol=1e-6, atol=1e-6)
    real, fake = discriminator_loss(logits, logits)
    assert torch.isfinite(real) and torch.isfinite(fake)
