"""Training batches: a pure function of (seed, iteration), aligned LR/HR crops, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from srcore import config
from srcore.data.datasets import Pair, RandomCropBatches, load_pairs
from srcore.data.images import ImageError, save_png
from srcore.data.manifest import write_manifest
from srcore.training.loop import batches
from srcore.training.runtime import memory_format
from tests.conftest import tiny_params_dict

S = 4


def _pair(name: str, h: int, w: int, seed: int, grey: bool = False) -> Pair:
    """HR whose every SxS block is one LR pixel: any aligned crop satisfies HR = kron(LR)."""
    rng = np.random.default_rng(seed)
    lr = rng.integers(0, 256, (h, w) if grey else (h, w, 3), dtype=np.uint8)
    hr = np.repeat(np.repeat(lr, S, axis=0), S, axis=1)
    return Pair(name, hr, lr)


def _to_uint8(lr: torch.Tensor, hr: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    lr_u = (lr * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    hr_u = ((hr + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return lr_u, hr_u


PAIRS = [_pair("a", 12, 16, 0), _pair("b", 10, 10, 1), _pair("grey", 9, 11, 2, grey=True)]


def test_batch_is_a_pure_function_of_seed_and_iteration() -> None:
    one = RandomCropBatches(PAIRS, 4, 16, S, seed=7, augment=True)
    two = RandomCropBatches(PAIRS, 4, 16, S, seed=7, augment=True)
    forward = [one[i] for i in range(6)]
    backward = [two[i] for i in reversed(range(6))][::-1]  # other order, other instance
    for (lr_a, hr_a), (lr_b, hr_b) in zip(forward, backward, strict=True):
        assert torch.equal(lr_a, lr_b) and torch.equal(hr_a, hr_b)
    assert not torch.equal(forward[0][1], forward[1][1])
    other_seed = RandomCropBatches(PAIRS, 4, 16, S, seed=8, augment=True)
    assert not torch.equal(other_seed[0][1], forward[0][1])


def test_ranges_shapes_and_alignment_under_augmentation() -> None:
    data = RandomCropBatches(PAIRS, 8, 16, S, seed=0, augment=True)
    for i in range(10):
        lr, hr = data[i]
        assert lr.shape == (8, 3, 4, 4) and hr.shape == (8, 3, 16, 16)
        assert lr.dtype == hr.dtype == torch.float32
        assert lr.min() >= 0 and lr.max() <= 1 and hr.min() >= -1 and hr.max() <= 1
        lr_u, hr_u = _to_uint8(lr, hr)
        for b in range(8):  # the same flip/rotation was applied to both crops
            assert np.array_equal(hr_u[b], np.repeat(np.repeat(lr_u[b], S, 0), S, 1))


def _is_window(crop: np.ndarray, images: list[np.ndarray]) -> bool:
    c = crop.shape[0]
    for img in images:
        for y in range(img.shape[0] - c + 1):
            for x in range(img.shape[1] - c + 1):
                if np.array_equal(img[y:y + c, x:x + c], crop):
                    return True
    return False


def test_augment_switches_flips_and_rotations() -> None:
    rgb = [np.repeat(p.lr[..., None], 3, 2) if p.lr.ndim == 2 else p.lr for p in PAIRS]
    plain = RandomCropBatches(PAIRS, 8, 16, S, seed=0, augment=False)
    assert all(_is_window(c, rgb) for c in _to_uint8(*plain[0])[0])
    augmented = RandomCropBatches(PAIRS, 8, 16, S, seed=0, augment=True)
    crops = [c for i in range(3) for c in _to_uint8(*augmented[i])[0]]
    assert not all(_is_window(c, rgb) for c in crops)


def test_crops_are_uniform_over_pixels_not_images() -> None:
    small, big = _pair("small", 8, 8, 3), _pair("big", 8, 24, 4)
    data = RandomCropBatches([small, big], 50, 32, S, seed=0, augment=False)
    assert data.weights.tolist() == pytest.approx([0.25, 0.75])
    lrs = torch.cat([data[i][0] for i in range(8)])  # 400 crops
    # "small" is 8x8 at LR, the crop size: a crop from it is the whole image
    whole = torch.from_numpy(small.lr).permute(2, 0, 1).float() / 255
    n_small = int((lrs == whole).flatten(1).all(1).sum())
    assert 0.15 < n_small / len(lrs) < 0.35

    per_image = RandomCropBatches([small, big], 50, 32, S, seed=0, augment=False,
                                  sampling="image")
    assert per_image.weights.tolist() == pytest.approx([0.5, 0.5])
    lrs = torch.cat([per_image[i][0] for i in range(8)])
    assert 0.4 < int((lrs == whole).flatten(1).all(1).sum()) / len(lrs) < 0.6
    with pytest.raises(ValueError, match="sampling"):
        RandomCropBatches([small, big], 2, 32, S, seed=0, augment=False, sampling="area")


def test_flat_crops_are_redrawn_when_asked() -> None:
    """Half the image is one grey level: without min_std about half the crops are flat."""
    rng = np.random.default_rng(5)
    lr = np.full((16, 32, 3), 128, np.uint8)
    lr[:, 16:] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    pair = Pair("half", np.repeat(np.repeat(lr, S, axis=0), S, axis=1), lr)

    def flat_share(data: RandomCropBatches) -> float:
        hrs = torch.cat([data[i][1] for i in range(10)])  # 200 crops of 8x8 LR
        return float((hrs.flatten(1).std(1) * 127.5 < 8).float().mean())

    assert 0.2 < flat_share(RandomCropBatches([pair], 20, 32, S, seed=0, augment=False)) < 0.8
    redrawn = RandomCropBatches([pair], 20, 32, S, seed=0, augment=False, min_std=8.0)
    assert flat_share(redrawn) == 0.0
    # still a pure function of (seed, iteration), and aligned
    assert all(torch.equal(a, b) for a, b in zip(redrawn[3], redrawn[3], strict=True))
    lr_u, hr_u = _to_uint8(*redrawn[3])
    assert np.array_equal(np.repeat(np.repeat(lr_u, S, axis=1), S, axis=2), hr_u)


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="multiple of scale"):
        RandomCropBatches(PAIRS, 2, 18, S, 0, False)
    with pytest.raises(ImageError, match="hr_crop 64"):
        RandomCropBatches(PAIRS, 2, 64, S, 0, False)
    wrong = Pair("wrong", PAIRS[0].hr, PAIRS[0].lr[:6])
    with pytest.raises(ImageError, match="wrong"):
        RandomCropBatches([wrong], 2, 16, S, 0, False)


def test_load_pairs_checks_partners_and_scale(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="srgan prepare"):
        load_pairs(tmp_path, "nope")
    p = _pair("x", 6, 8, 0)
    save_png(p.hr, tmp_path / "set" / "HR" / "x.png")
    save_png(p.lr, tmp_path / "set" / "LR" / "x.png")
    write_manifest(tmp_path / "set", {})
    assert load_pairs(tmp_path, "set", S)[0].hr.shape == (24, 32, 3)
    with pytest.raises(ImageError, match="another scale"):
        load_pairs(tmp_path, "set", 2)
    save_png(p.hr, tmp_path / "set" / "HR" / "y.png")
    write_manifest(tmp_path / "set", {})
    with pytest.raises(FileNotFoundError, match="y.png"):
        load_pairs(tmp_path, "set")


def test_loader_workers_and_resume_offset_see_the_same_batches() -> None:
    params = config.parse(tiny_params_dict(pretrain={"iterations": 6, "batch_size": 3,
                                                     "hr_crop": 16}))
    cfg, cpu = params.pretrain, torch.device("cpu")
    serial = list(batches(params, cfg, PAIRS, 0, cpu))
    assert len(serial) == 6
    resumed = list(batches(params, cfg, PAIRS, 4, cpu))
    parallel = list(batches(params.model_copy(update={"runtime": params.runtime.model_copy(
        update={"num_workers": 2})}), cfg, PAIRS, 0, cpu))
    for (lr_a, hr_a), (lr_b, hr_b) in zip(serial[4:], resumed, strict=True):
        assert torch.equal(lr_a, lr_b) and torch.equal(hr_a, hr_b)
    for (lr_a, hr_a), (lr_b, hr_b) in zip(serial, parallel, strict=True):
        assert torch.equal(lr_a, lr_b) and torch.equal(hr_a, hr_b)
    assert serial[0][0].is_contiguous(memory_format=memory_format(params))
