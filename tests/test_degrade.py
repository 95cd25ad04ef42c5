"""Tests for srcore.data.degrade: bit-exact MATLAB bicubic parity plus unit behaviour.

The parity tests compare against the MATLAB-made ``LR_bicubic_X4`` images of Set5/Set14/BSD100
in the shared dataset folder; they skip (with the reason) when that folder is not present,
the unit tests below always run.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from srcore.data.degrade import bicubic_lr, gaussian_prefilter, imresize, modcrop

PARITY_SETS = ("Set5", "Set14", "BSD100")


def _shared_datasets() -> Path:
    """SRGAN_SHARED_DATASETS if set, else <repo>/../shared/datasets (repo sits next to shared)."""
    env = os.environ.get("SRGAN_SHARED_DATASETS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "datasets"


SHARED = _shared_datasets()


def _lr_path(hr_path: Path) -> Path:
    return hr_path.parent.parent / "LR_bicubic_X4" / hr_path.name.replace("_HR.", "_LR.")


def _parity_cases() -> list:
    cases = [
        pytest.param(hr, id=f"{name}/{hr.stem}")
        for name in PARITY_SETS
        for hr in sorted((SHARED / name / "HR").glob("*.png"))
    ]
    if not cases:
        reason = f"MATLAB reference images not found under {SHARED} (set SRGAN_SHARED_DATASETS)"
        cases = [pytest.param(None, id="no-shared-datasets", marks=pytest.mark.skip(reason=reason))]
    return cases


def _load(path: Path) -> np.ndarray:
    # No .convert(): grey images (Set14 img_003) must stay HxW like MATLAB's imread.
    return np.asarray(Image.open(path))


def _ramp(h: int, w: int) -> np.ndarray:
    return np.tile(np.arange(w, dtype=np.float64), (h, 1))


# --------------------------------------------------------------------------- MATLAB parity


@pytest.mark.parametrize("hr_path", _parity_cases())
def test_bit_identical_to_matlab(hr_path: Path) -> None:
    hr = _load(hr_path)
    expected = _load(_lr_path(hr_path))
    ours = bicubic_lr(hr, 4)
    assert ours.dtype == np.uint8
    assert ours.shape == expected.shape
    n_diff = int(np.count_nonzero(ours != expected))
    assert n_diff == 0, f"{n_diff} pixels differ from MATLAB"


def test_counter_examples_are_not_identical() -> None:
    """Guard that the parity test can fail: near-misses of MATLAB's algorithm are detected."""
    hr_path = SHARED / "Set5" / "HR" / "img_001_SRF_4_HR.png"
    if not hr_path.exists():
        pytest.skip(f"MATLAB reference images not found under {SHARED}")
    hr, expected = _load(hr_path), _load(_lr_path(hr_path))

    # Mirrored borders (BasicSR-style) differ, but only in the 2 outermost rows/columns.
    diff = imresize(hr, 0.25, border="symmetric") != expected
    assert diff.any()
    assert not diff[2:-2, 2:-2].any()

    # A double (unrounded) intermediate between the passes is not what MATLAB does.
    as_float = imresize(hr.astype(np.float64), 0.25)
    rounded = np.clip(np.floor(as_float + 0.5), 0, 255).astype(np.uint8)
    assert not np.array_equal(rounded, expected)

    # Pillow's bicubic is a different filter.
    pil = Image.fromarray(hr).resize(expected.shape[1::-1], Image.Resampling.BICUBIC)
    assert not np.array_equal(np.asarray(pil), expected)


# --------------------------------------------------------------------------- imresize


@pytest.mark.parametrize(
    ("shape", "scale", "out_hw"),
    [
        ((40, 24), 0.25, (10, 6)),
        ((40, 24, 3), 0.25, (10, 6)),
        ((10, 7, 3), 0.25, (3, 2)),  # MATLAB's ceil(in * scale)
        ((9, 5), 0.5, (5, 3)),
        ((6, 5, 3), 4.0, (24, 20)),
        ((6, 5), 4.0, (24, 20)),
        ((5, 8), 1.5, (8, 12)),
    ],
)
def test_output_shape_and_dtype(shape: tuple[int, ...], scale: float, out_hw: tuple) -> None:
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = imresize(img, scale)
    assert out.shape == out_hw + shape[2:]
    assert out.dtype == np.uint8


def test_rgb_equals_per_channel_grey() -> None:
    img = np.random.default_rng(1).integers(0, 256, (37, 29, 3), dtype=np.uint8)
    rgb = imresize(img, 0.25)
    for c in range(3):
        grey = np.ascontiguousarray(img[..., c])
        np.testing.assert_array_equal(rgb[..., c], imresize(grey, 0.25))


@pytest.mark.parametrize("scale", [0.25, 0.5, 2.0, 4.0])
def test_constant_image_stays_constant(scale: float) -> None:
    """Weights sum to 1 per output pixel, borders included."""
    img = np.full((13, 11, 3), 200, dtype=np.uint8)
    np.testing.assert_array_equal(imresize(img, scale), 200)


@pytest.mark.parametrize(
    ("scale", "width"),
    [(0.25, 64), (4.0, 16), (0.5, 40)],
)
def test_linear_ramp_follows_matlab_coordinate_mapping(scale: float, width: int) -> None:
    """Keys' cubic reproduces linear functions, so away from the borders out[x] = u(x) - 1 with
    MATLAB's u = x/scale + 0.5*(1 - 1/scale) (x 1-based) -- checks the pixel-centre mapping."""
    img = _ramp(8, width)
    out = imresize(img, scale)
    x = np.arange(1, out.shape[1] + 1, dtype=np.float64)
    expected = x / scale + 0.5 * (1 - 1 / scale) - 1
    margin = int(np.ceil(3 * max(scale, 1.0)))
    np.testing.assert_allclose(out[0, margin:-margin], expected[margin:-margin], atol=1e-9)
    # Replicated borders pull edge values toward the edge pixel, i.e. off the line.
    assert out[0, 0] != pytest.approx(expected[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_path_not_rounded(dtype: type) -> None:
    img = np.random.default_rng(2).random((32, 24, 3)).astype(dtype)
    out = imresize(img, 0.25)
    assert out.dtype == dtype
    assert out.shape == (8, 6, 3)
    assert not np.allclose(out, np.round(out))  # fractional values survive
    # float scaled 0..255 agrees with the uint8 path to within the per-pass rounding.
    u8 = (img * 255).round().astype(np.uint8)
    diff = imresize(u8.astype(dtype), 0.25).astype(np.float64) - imresize(u8, 0.25)
    assert np.abs(diff).max() <= 1.5


def test_float_path_does_not_clip() -> None:
    img = np.zeros((16, 16))
    img[:, 8:] = 1.0
    out = imresize(img, 4.0)
    assert out.min() < 0.0 and out.max() > 1.0  # cubic overshoot kept for float input


def test_uint8_rounding_saturates() -> None:
    img = np.zeros((16, 16), dtype=np.uint8)
    img[:, 8:] = 255
    out = imresize(img, 4.0)  # overshoot would exceed 255 / go below 0 without saturation
    assert out.min() == 0 and out.max() == 255


@pytest.mark.parametrize(
    ("image", "scale", "match"),
    [
        (np.zeros((8, 8), np.uint16), 0.5, "dtype"),
        (np.zeros((8, 8), np.int64), 0.5, "dtype"),
        (np.zeros(8, np.uint8), 0.5, "ndim"),
        (np.zeros((2, 8, 8, 3), np.uint8), 0.5, "ndim"),
        (np.zeros((0, 8), np.uint8), 0.5, "non-empty"),
        (np.zeros((8, 8), np.uint8), 0.0, "scale"),
        (np.zeros((8, 8), np.uint8), -0.25, "scale"),
        (np.zeros((8, 8), np.uint8), float("nan"), "scale"),
        (np.zeros((8, 8), np.uint8), "0.25", "scale"),
        ([[1, 2], [3, 4]], 0.5, "numpy array"),
    ],
)
def test_imresize_errors(image: object, scale: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        imresize(image, scale)  # type: ignore[arg-type]


def test_imresize_bad_border() -> None:
    with pytest.raises(ValueError, match="border"):
        imresize(np.zeros((8, 8), np.uint8), 0.5, border="wrap")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- modcrop


@pytest.mark.parametrize(
    ("shape", "scale", "out_hw"),
    [((10, 7), 4, (8, 4)), ((10, 7, 3), 4, (8, 4)), ((12, 8, 3), 4, (12, 8)), ((5, 5), 1, (5, 5))],
)
def test_modcrop_shape(shape: tuple[int, ...], scale: int, out_hw: tuple) -> None:
    img = np.arange(np.prod(shape)).reshape(shape)
    out = modcrop(img, scale)
    assert out.shape == out_hw + shape[2:]
    np.testing.assert_array_equal(out, img[: out_hw[0], : out_hw[1]])  # top-left kept


@pytest.mark.parametrize("scale", [0, -2, 2.0, True])
def test_modcrop_bad_scale(scale: object) -> None:
    with pytest.raises(ValueError, match="scale"):
        modcrop(np.zeros((8, 8)), scale)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- bicubic_lr


def test_bicubic_lr_is_imresize_inverse_scale() -> None:
    hr = np.random.default_rng(3).integers(0, 256, (48, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(bicubic_lr(hr, 4), imresize(hr, 0.25))
    assert bicubic_lr(hr, 2).shape == (24, 16, 3)


def test_bicubic_lr_rejects_non_multiple() -> None:
    with pytest.raises(ValueError, match=r"not a multiple of scale 4.*modcrop"):
        bicubic_lr(np.zeros((30, 32, 3), np.uint8), 4)


@pytest.mark.parametrize("scale", [0, 2.5, "4"])
def test_bicubic_lr_bad_scale(scale: object) -> None:
    with pytest.raises(ValueError, match="scale"):
        bicubic_lr(np.zeros((32, 32), np.uint8), scale)  # type: ignore[arg-type]


def test_gaussian_prefilter_changes_output() -> None:
    hr = np.random.default_rng(4).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    plain = bicubic_lr(hr, 4)
    blurred = bicubic_lr(hr, 4, gaussian_sigma=1.5)
    assert blurred.shape == plain.shape and blurred.dtype == np.uint8
    assert not np.array_equal(blurred, plain)
    assert blurred.std() < plain.std()  # extra low-pass removes variance of noise


def test_gaussian_prefilter_properties() -> None:
    img = np.random.default_rng(5).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = gaussian_prefilter(img, 1.0)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert out.std() < img.std()
    flat = np.full((9, 9), 77, np.uint8)
    np.testing.assert_array_equal(gaussian_prefilter(flat, 2.0), 77)  # normalised, no edge loss
    # Channels are not mixed: blurring a single-channel impulse leaves other channels at zero.
    imp = np.zeros((9, 9, 3), np.float64)
    imp[4, 4, 1] = 1.0
    res = gaussian_prefilter(imp, 1.0)
    assert res.dtype == np.float64
    assert res[..., 0].max() == 0 and res[..., 2].max() == 0
    assert res[..., 1].sum() == pytest.approx(1)


@pytest.mark.parametrize("sigma", [0, -1.0, float("inf"), "1"])
def test_gaussian_prefilter_bad_sigma(sigma: object) -> None:
    with pytest.raises(ValueError, match="sigma"):
        gaussian_prefilter(np.zeros((8, 8), np.uint8), sigma)  # type: ignore[arg-type]
