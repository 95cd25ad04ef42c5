"""Tiled inference equals whole-image inference once tiles carry the receptive field."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from srcore.data.images import list_images, load_image
from srcore.metrics import psnr_y
from srcore.models.srresnet import SRResNet
from srcore.upscale import receptive_radius, upscale_image, upscale_tensor
from tests.conftest import SHARED_DATASETS


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """On 2 shared cores, 2 intra-op threads spin against other processes: 1 is faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(blocks: int, channels: int, seed: int = 0) -> SRResNet:
    """Random weights and non-trivial BN running statistics, so BN matters."""
    torch.manual_seed(seed)
    model = SRResNet(blocks=blocks, channels=channels, scale=4, global_skip=True)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("blocks", [1, 2, 16])
def test_receptive_radius_of_srresnet(blocks: int) -> None:
    # 9x9 head (4) + 2 per block + body tail (1) + first upsampler (1) + second at x2 (0.5)
    # + 9x9 tail at x4 (1) = 7.5 + 2B, rounded up.
    assert receptive_radius(SRResNet(blocks=blocks, channels=4)) == 8 + 2 * blocks


def test_tiled_equals_untiled_when_overlap_covers_the_receptive_field() -> None:
    model = _model(blocks=1, channels=8)
    lr = torch.rand(2, 3, 37, 29, generator=torch.Generator().manual_seed(1))
    whole = upscale_tensor(model, lr, 4)
    radius = receptive_radius(model)
    # 8 does not divide 37 or 29: ragged last tiles, with context only on one side.
    tiled = upscale_tensor(model, lr, 4, tile=8, overlap=radius)
    assert tiled.shape == whole.shape == (2, 3, 148, 116)
    assert (tiled - whole).abs().max().item() < 1e-5
    # One pixel less context is already visible at the seams: the radius is tight.
    short = upscale_tensor(model, lr, 4, tile=8, overlap=radius - 1)
    assert (short - whole).abs().max().item() > 1e-5


def test_a_model_in_training_mode_is_run_in_eval_mode_and_given_back_as_it_was() -> None:
    model = _model(blocks=1, channels=8).train()
    lr = torch.rand(1, 3, 20, 18, generator=torch.Generator().manual_seed(2))
    tiled = upscale_tensor(model, lr, 4, tile=6, overlap=receptive_radius(model))
    assert model.training
    with torch.no_grad():
        expected = model.eval()(lr)
    torch.testing.assert_close(tiled, expected, atol=1e-5, rtol=0)


def test_bad_tiling_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="tile and overlap"):
        upscale_tensor(_model(1, 4), torch.rand(1, 3, 8, 8), 4, tile=4, overlap=-1)
    with pytest.raises(ValueError, match="not x2"):
        upscale_tensor(_model(1, 4), torch.rand(1, 3, 8, 8), 2, tile=4, overlap=2)


def test_set14_tiled_and_untiled_agree_within_a_hundredth_of_a_db() -> None:
    folder = SHARED_DATASETS / "Set14"
    if not (folder / "HR").is_dir():
        pytest.skip(f"{folder} not found (set SRGAN_SHARED_DATASETS to the shared datasets)")
    model = _model(blocks=2, channels=8)
    overlap = receptive_radius(model)
    tiled_any = False
    for hr_path in list_images(folder / "HR"):
        lr = load_image(folder / "LR_bicubic_X4" / hr_path.name.replace("_HR", "_LR"))
        hr = load_image(hr_path)
        whole = upscale_image(model, lr, 4)
        tiled = upscale_image(model, lr, 4, tile=64, overlap=overlap)
        tiled_any |= max(lr.shape[:2]) > 64
        assert tiled.shape == whole.shape == hr.shape, hr_path.name
        gap = abs(psnr_y(tiled, hr) - psnr_y(whole, hr))
        assert gap < 0.01, f"{hr_path.name}: tiled and whole-image PSNR-Y differ by {gap} dB"
    assert tiled_any
