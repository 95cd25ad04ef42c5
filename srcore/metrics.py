"""Super-resolution evaluation metrics, following the field's standard protocol.

SR papers (SRCNN, VDSR, SRGAN, ...) report PSNR/SSIM on the luma channel Y of ITU-R BT.601,
computed exactly as MATLAB's ``rgb2ycbcr`` does, after shaving ``scale`` pixels off every
border (the border of an upscaled image is dominated by the upscaler's padding convention,
not by the model). We keep Y unrounded float64 because that is what the reference
MATLAB/BasicSR scripts compare; rounding to uint8 shifts PSNR by a few hundredths of a dB.

Three numbers are provided:

* :func:`psnr_y` - PSNR on Y, peak 255.
* :func:`ssim_y` - Wang et al. (2004) SSIM as in ``ssim_index.m`` / BasicSR
  ``calculate_ssim``: 11x11 Gaussian (sigma 1.5), 'valid' region only.
* :func:`ssim_daala_y` - the SSIM the SRGAN paper's Table 2 used (Xiph daala
  ``tools/dump_ssim.c``): a Gaussian whose width scales with the image height.
* :func:`niqe_y` - NIQE (Mittal et al. 2013), a no-reference naturalness score (lower is
  better) that does not reward blur, as the LIVE MATLAB release computes it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import io
import math

import numpy as np
from scipy import ndimage, special

from srcore.data.degrade import imresize

__all__ = ["NiqeModelError", "luma", "niqe_y", "psnr_y", "rgb_to_y", "ssim_daala_y", "ssim_y"]

_PEAK = 255.0
_C1 = (0.01 * _PEAK) ** 2
_C2 = (0.03 * _PEAK) ** 2
# MATLAB rgb2ycbcr: Y = 16 + [65.481, 128.553, 24.966] . (RGB / 255)
_Y_COEFFS = np.array([65.481, 128.553, 24.966], dtype=np.float64)
_WANG_WIN = 11
_WANG_SIGMA = 1.5
# daala dump_ssim.c fixed-point kernel precision (KERNEL_SHIFT = 8).
_DAALA_KERNEL_WEIGHT = 256


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """BT.601 luma of a uint8 HxWx3 RGB image, as MATLAB ``rgb2ycbcr`` but unrounded.

    Returns float64 in [16, 235]. Not rounded, because the reference scripts feed the
    double-precision Y straight into PSNR/SSIM.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"rgb_to_y expects uint8, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"rgb_to_y expects an HxWx3 RGB image, got shape {image.shape}")
    rgb = image.astype(np.float64) / 255.0
    return 16.0 + rgb @ _Y_COEFFS


def luma(image: np.ndarray) -> np.ndarray:
    """Y used for evaluation: grey (HxW) values as-is, RGB (HxWx3) via :func:`rgb_to_y`.

    A grey image stays grey, not mapped to 16..235: the field's MATLAB scripts only call
    ``rgb2ycbcr`` when the image has 3 channels, so a grey image's values are its Y. This
    is why e.g. the SRGAN paper's Set14 bicubic PSNR is 25.99 dB rather than the 26.09 dB
    obtained by treating the grey image as R=G=B.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"luma expects uint8, got dtype {image.dtype}")
    if image.ndim == 2:
        return image.astype(np.float64)
    return rgb_to_y(image)


def _cropped_pair(sr: np.ndarray, hr: np.ndarray, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate the pair, convert to Y and shave ``crop`` pixels off every border."""
    if sr.shape != hr.shape or sr.dtype != np.uint8 or hr.dtype != np.uint8:
        raise ValueError(
            "sr and hr must be uint8 arrays of identical shape; got "
            f"sr shape {sr.shape} dtype {sr.dtype}, hr shape {hr.shape} dtype {hr.dtype}"
        )
    if sr.ndim not in (2, 3) or (sr.ndim == 3 and sr.shape[2] != 3):
        raise ValueError(f"expected an HxW grey or HxWx3 RGB image, got shape {sr.shape}")
    if crop < 0:
        raise ValueError(f"crop must be >= 0, got {crop}")
    h, w = sr.shape[:2]
    if h <= 2 * crop or w <= 2 * crop:
        raise ValueError(f"crop={crop} leaves nothing of a {h}x{w} image")
    y_sr, y_hr = luma(sr), luma(hr)
    if crop:
        y_sr = y_sr[crop:-crop, crop:-crop]
        y_hr = y_hr[crop:-crop, crop:-crop]
    return y_sr, y_hr


def psnr_y(sr: np.ndarray, hr: np.ndarray, crop: int = 4) -> float:
    """PSNR (dB, peak 255) on float64 Y after removing ``crop`` border pixels.

    ``crop`` is conventionally the SR scale factor. Identical images give ``math.inf``.
    """
    y_sr, y_hr = _cropped_pair(sr, hr, crop)
    mse = float(np.mean((y_sr - y_hr) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(_PEAK**2 / mse)


def _ssim_map(
    x: np.ndarray, y: np.ndarray, filt1d: np.ndarray, mode: str
) -> tuple[np.ndarray, np.ndarray]:
    """Local SSIM map from separable filtering with the (unnormalised) 1-D kernel ``filt1d``.

    Returns ``(ssim_map, weight_map)`` where ``weight_map`` is the kernel mass that fell on
    the image at each pixel (constant in the interior, smaller near borders with zero
    padding). Moments are normalised by that mass, i.e. a truncated window is renormalised.
    """

    def blur(a: np.ndarray) -> np.ndarray:
        a = ndimage.correlate1d(a, filt1d, axis=0, mode=mode, cval=0.0)
        return ndimage.correlate1d(a, filt1d, axis=1, mode=mode, cval=0.0)

    w = blur(np.ones_like(x))
    mu_x = blur(x) / w
    mu_y = blur(y) / w
    var_x = blur(x * x) / w - mu_x * mu_x
    var_y = blur(y * y) / w - mu_y * mu_y
    cov = blur(x * y) / w - mu_x * mu_y
    num = (2.0 * mu_x * mu_y + _C1) * (2.0 * cov + _C2)
    den = (mu_x * mu_x + mu_y * mu_y + _C1) * (var_x + var_y + _C2)
    return num / den, w


def ssim_y(sr: np.ndarray, hr: np.ndarray, crop: int = 4) -> float:
    """Wang et al. SSIM on Y, as ``ssim_index.m`` (MATLAB) and BasicSR ``calculate_ssim``.

    11x11 normalised Gaussian window, sigma 1.5, C1 = (0.01*255)^2, C2 = (0.03*255)^2,
    population (biased) variances, mean of the SSIM map over the 'valid' region only
    (pixels whose whole window lies inside the cropped image). Valid-only is what the
    reference scripts do (``filter2(..., 'valid')``); it avoids inventing pixels by
    padding, and equals scikit-image's ``structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=255)``, which also discards a
    5-pixel border before averaging.
    """
    y_sr, y_hr = _cropped_pair(sr, hr, crop)
    r = _WANG_WIN // 2
    if min(y_sr.shape) < _WANG_WIN:
        raise ValueError(
            f"ssim_y needs at least {_WANG_WIN}x{_WANG_WIN} pixels after crop, got {y_sr.shape}"
        )
    t = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-(t * t) / (2.0 * _WANG_SIGMA**2))
    g /= g.sum()
    # Boundary mode is irrelevant: only the interior, untouched by padding, is kept.
    smap, _ = _ssim_map(y_sr, y_hr, g, mode="reflect")
    return float(smap[r:-r, r:-r].mean())


def _daala_gaussian_kernel(sigma: float, max_len: int) -> np.ndarray:
    """Integer kernel of daala ``dump_ssim.c::gaussian_filter_init`` (weights sum to 256).

    Radius = floor(sigma * sqrt(-2 ln s)) with s = sqrt(pi/2) * sigma / 256, i.e. the first
    tap whose fixed-point value would round to (about) zero is dropped; capped at
    ``max_len - 1``. Off-centre taps are round(256 * N(k; 0, sigma)); the centre tap takes
    the remainder so the weights sum to exactly 256.
    """
    scale = 1.0 / (math.sqrt(2.0 * math.pi) * sigma)
    s = math.sqrt(0.5 * math.pi) * sigma / _DAALA_KERNEL_WEIGHT
    length = 0 if s >= 1.0 else math.floor(sigma * math.sqrt(-2.0 * math.log(s)))
    klen = max_len - 1 if length >= max_len else int(length)
    taps = [
        int(_DAALA_KERNEL_WEIGHT * scale * math.exp(-0.5 * k * k / (sigma * sigma)) + 0.5)
        for k in range(1, klen + 1)
    ]
    centre = _DAALA_KERNEL_WEIGHT - 2 * sum(taps)
    return np.array(taps[::-1] + [centre] + taps, dtype=np.float64)


def ssim_daala_y(sr: np.ndarray, hr: np.ndarray, crop: int = 4) -> float:
    """SSIM as Xiph daala ``tools/dump_ssim.c`` (used for the SRGAN paper's Table 2), on Y.

    What this reproduces exactly (ported from ``calc_ssim`` in dump_ssim.c):

    * Gaussian sigma = 1.5 * H / 256 (H = image height after crop; pixel aspect 1, so the
      horizontal kernel equals the vertical one - daala derives both from H).
    * daala's fixed-point kernel (:func:`_daala_gaussian_kernel`): 8-bit weights summing to
      256, radius floor(sigma*sqrt(-2 ln(sqrt(pi/2)*sigma/256))) capped at min(H, W) - 1.
      E.g. H = 504 -> sigma 2.95, radius 8; H = 248 -> sigma 1.45, radius 4.
    * Separable filtering with zero padding; at borders the window is truncated and the
      moments are renormalised by the mass that fell inside the image.
    * SSIM map over *every* pixel (no valid-region cropping), averaged with weights equal to
      that in-image window mass, so border pixels count slightly less.
    * C1 = (0.01*255)^2, C2 = (0.03*255)^2, population variances.

    What differs from running dump_ssim on the paper's files: daala reads 8-bit Y' planes of
    a .y4m, so its input Y was rounded to integers by whatever RGB->Y'CbCr converter made the
    .y4m (unknown for the paper; typically BT.601 limited range like ours), and its moments
    are exact int64 sums. We use unrounded float64 Y from :func:`luma`; for grey input the
    computation matches dump_ssim to floating-point precision. Whether the paper cropped
    borders before dump_ssim is not documented; ``crop`` defaults to 4 for consistency with
    :func:`ssim_y` (pass 0 for the whole image).
    """
    y_sr, y_hr = _cropped_pair(sr, hr, crop)
    h, w = y_sr.shape
    kernel = _daala_gaussian_kernel(h * (1.5 / 256.0), min(h, w))
    smap, weight = _ssim_map(y_sr, y_hr, kernel, mode="constant")
    return float(np.sum(smap * weight) / np.sum(weight))


# ---------------------------------------------------------------------------- NIQE
#
# Mittal, Soundararajan & Bovik, "Making a 'Completely Blind' Image Quality Analyzer", IEEE
# SPL 2013, following the LIVE MATLAB release (computequality.m, computefeature.m,
# estimateaggdparam.m) step by step, in double precision as MATLAB computes: float32 moves
# single images by up to 0.3, because each AGGD shape parameter is an argmin on a 0.001 grid
# and a small image gives few 96x96 blocks for a 36x36 covariance.

#: The pristine model (mu 1x36, cov 36x36, 7x7 window fspecial('gaussian', 7, 7/6)) from the
#: LIVE release, as BasicSR distributes it; shipped in srcore/assets and checked on load.
NIQE_PARAMS_SHA256 = "2a7c182a68c9e7f1b2e2e5ec723279d6f65d912b6fcaf37eb2bf03d7367c4296"
_NIQE_PARAMS_FILE = "niqe_pris_params.npz"
_NIQE_BLOCK = 96
# computefeature.m: circshift offsets of the four neighbour products (H, V, two diagonals).
_NIQE_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))
# Rows of the (rows x 9801) AGGD grid search evaluated at once: bounds memory on big images.
_AGGD_CHUNK = 128


class NiqeModelError(RuntimeError):
    """The packaged NIQE pristine model is missing or not the published file."""


@functools.lru_cache(maxsize=1)
def _niqe_model() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mu_pris 36, cov_pris 36x36, window 7x7) from the packaged file, sha256-checked once."""
    res = importlib.resources.files("srcore") / "assets" / _NIQE_PARAMS_FILE
    fix = "reinstall srgan-pipeline (the file ships in srcore/assets; NIQE never downloads it)"
    try:
        raw = res.read_bytes()
    except OSError:
        raise NiqeModelError(f"{res}: NIQE pristine model missing; {fix}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != NIQE_PARAMS_SHA256:
        raise NiqeModelError(
            f"{res}: NIQE pristine model altered (sha256 {digest}, expected "
            f"{NIQE_PARAMS_SHA256}); {fix}"
        )
    with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
        mu = np.asarray(npz["mu_pris_param"], dtype=np.float64).reshape(36)
        cov = np.asarray(npz["cov_pris_param"], dtype=np.float64).reshape(36, 36)
        window = np.asarray(npz["gaussian_window"], dtype=np.float64).reshape(7, 7)
    return mu, cov, window


@functools.lru_cache(maxsize=1)
def _aggd_table() -> tuple[np.ndarray, np.ndarray]:
    """estimateaggdparam.m's grid ``gam = 0.2:0.001:10`` and ``r_gam`` over it.

    The grid is built the way MATLAB's colon operator does (a + k*d from the left half,
    b - k*d from the right, exact midpoint), so the candidate shape values are MATLAB's.
    """
    a, d, b, n = 0.2, 0.001, 10.0, 9800
    gam = np.empty(n + 1, dtype=np.float64)
    k = np.arange(n // 2 + 1, dtype=np.float64)
    gam[: n // 2 + 1] = a + k * d
    gam[n - np.arange(n // 2 + 1)] = b - k * d
    gam[n // 2] = (a + b) / 2.0
    r_gam = special.gamma(2.0 / gam) ** 2 / (special.gamma(1.0 / gam) * special.gamma(3.0 / gam))
    return gam, r_gam


def _aggd_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise estimateaggdparam.m: (alpha, beta_l, beta_r) for every row of ``x`` at once.

    A side with no samples gives NaN (MATLAB's mean of an empty vector); an all-NaN search
    picks the first grid value, as MATLAB's ``min`` does, so such rows carry NaN betas that
    the caller's nanmean/nancov handle exactly as the MATLAB code does.
    """
    gam, r_gam = _aggd_table()
    sq = x * x
    neg, pos = x < 0, x > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        left_std = np.sqrt(np.where(neg, sq, 0.0).sum(axis=1) / neg.sum(axis=1))
        right_std = np.sqrt(np.where(pos, sq, 0.0).sum(axis=1) / pos.sum(axis=1))
        gammahat = left_std / right_std
        rhat = np.mean(np.abs(x), axis=1) ** 2 / np.mean(sq, axis=1)
        rhatnorm = rhat * (gammahat**3 + 1) * (gammahat + 1) / ((gammahat**2 + 1) ** 2)
    pos_idx = np.empty(x.shape[0], dtype=np.int64)
    for start in range(0, x.shape[0], _AGGD_CHUNK):
        chunk = rhatnorm[start : start + _AGGD_CHUNK, None]
        pos_idx[start : start + _AGGD_CHUNK] = np.argmin((r_gam[None, :] - chunk) ** 2, axis=1)
    alpha = gam[pos_idx]
    ratio = np.sqrt(special.gamma(1.0 / alpha) / special.gamma(3.0 / alpha))
    return alpha, left_std * ratio, right_std * ratio


def _niqe_scale_features(img: np.ndarray, window: np.ndarray, block: int) -> np.ndarray:
    """computefeature.m for every ``block`` x ``block`` tile of one scale: (tiles, 18).

    Tiles are ordered column-major (as blkproc + reshape order them in MATLAB).
    """
    mu = ndimage.correlate(img, window, mode="nearest")  # imfilter(..., 'replicate')
    sigma = np.sqrt(np.abs(ndimage.correlate(img * img, window, mode="nearest") - mu * mu))
    structdis = (img - mu) / (sigma + 1.0)
    nbh, nbw = img.shape[0] // block, img.shape[1] // block
    tiles = structdis.reshape(nbh, block, nbw, block).transpose(2, 0, 1, 3)
    tiles = tiles.reshape(nbh * nbw, block, block)
    n = nbh * nbw
    # Row groups: the coefficients, then their products with each circshifted neighbour.
    rows = [tiles.reshape(n, -1)]
    rows += [(tiles * np.roll(tiles, s, axis=(1, 2))).reshape(n, -1) for s in _NIQE_SHIFTS]
    alpha, beta_l, beta_r = (v.reshape(5, n) for v in _aggd_fit(np.concatenate(rows)))
    feats = [alpha[0], (beta_l[0] + beta_r[0]) / 2.0]
    for g in range(1, 5):
        ratio = special.gamma(2.0 / alpha[g]) / special.gamma(1.0 / alpha[g])
        mean = (beta_r[g] - beta_l[g]) * ratio
        feats += [alpha[g], mean, beta_l[g], beta_r[g]]
    return np.stack(feats, axis=1)


def _niqe_grey_level(image: np.ndarray) -> np.ndarray:
    """Integer grey levels as float64: grey values as-is, RGB via rgb2ycbcr's rounded Y."""
    if image.ndim == 2:
        return luma(image)
    # MATLAB rgb2ycbcr on uint8 returns uint8: round half away from zero (Y >= 16 > 0).
    return np.floor(luma(image) + 0.5)


def niqe_y(image: np.ndarray, crop: int = 4) -> float:
    """NIQE of a uint8 HxWx3 RGB or HxW grey image (lower = more natural), as the LIVE
    MATLAB release computes it, on rounded rgb2ycbcr Y (grey: its own values, as in
    :func:`luma`) after removing ``crop`` border pixels (SR papers use 4; the published
    value of the LIVE test image uses 0).

    The image is cut to whole 96x96 blocks (top-left kept); the second scale is MATLAB
    ``imresize(img, 0.5)`` on doubles. At least two blocks are needed, since a Gaussian
    is fitted to the per-block features. Raises ValueError for unusable input and for an
    image without enough texture for the fit (e.g. flat), and :class:`NiqeModelError` if
    the packaged pristine model is missing or altered.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        got = image.dtype if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"niqe_y expects a uint8 image, got {got}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"niqe_y expects an HxW grey or HxWx3 RGB image, got shape {image.shape}")
    if isinstance(crop, bool) or not isinstance(crop, (int, np.integer)) or crop < 0:
        raise ValueError(f"crop must be an integer >= 0, got {crop!r}")
    h, w = image.shape[:2]
    ch, cw = h - 2 * crop, w - 2 * crop
    nbh, nbw = max(ch, 0) // _NIQE_BLOCK, max(cw, 0) // _NIQE_BLOCK
    if nbh * nbw < 2:
        raise ValueError(
            f"niqe_y needs at least two whole {_NIQE_BLOCK}x{_NIQE_BLOCK} blocks after the "
            f"{crop}-pixel border crop; a {h}x{w} image leaves {max(ch, 0)}x{max(cw, 0)}"
        )
    mu_p, cov_p, window = _niqe_model()
    img = image[crop : h - crop, crop : w - crop]
    img = _niqe_grey_level(img)[: nbh * _NIQE_BLOCK, : nbw * _NIQE_BLOCK]

    feat1 = _niqe_scale_features(img, window, _NIQE_BLOCK)
    # Mirrored borders, as the imresize MATLAB R2021a ran for the published value: on the
    # LIVE test image they give 5.72996 against MATLAB's 5.72957; clamping gives 5.71951.
    half = imresize(img, 0.5, border="symmetric")
    feat = np.concatenate([feat1, _niqe_scale_features(half, window, _NIQE_BLOCK // 2)], axis=1)

    # nanmean / nancov (rows with any NaN dropped), as the MATLAB release.
    complete = feat[~np.isnan(feat).any(axis=1)]
    if complete.shape[0] < 2:
        raise ValueError(
            f"niqe_y: a {h}x{w} image has fewer than two textured {_NIQE_BLOCK}x{_NIQE_BLOCK} "
            "blocks (flat regions give no AGGD fit); NIQE is undefined for it"
        )
    mu_d = np.nanmean(feat, axis=0)
    cov_d = np.cov(complete, rowvar=False)
    diff = mu_p - mu_d
    quality = math.sqrt(float(diff @ np.linalg.pinv((cov_p + cov_d) / 2.0) @ diff))
    if not math.isfinite(quality):
        raise ValueError(f"niqe_y: NIQE is undefined for this {h}x{w} image (non-finite fit)")
    return quality
