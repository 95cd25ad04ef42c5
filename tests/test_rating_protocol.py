"""What a rater sees (srcore/rating/protocol.py): the per-rater shuffled plan with repeats,
calibration never drawn from rated images, versions of one size with no metadata."""

from __future__ import annotations

import io
import math
import zlib

import numpy as np
import pytest
from PIL import Image

from srcore.rating import BUILTIN_METHODS, protocol
from srcore.rating.store import Key, token_digest

KEYS = [Key("te", f"img{i}", m) for i in range(4) for m in BUILTIN_METHODS]


def test_a_plan_is_every_version_once_shuffled_per_rater_with_later_repeats() -> None:
    a, b = token_digest("token-a"), token_digest("token-b")
    plan_a = protocol.plan(a, KEYS, 0.1)
    assert plan_a == protocol.plan(a, list(reversed(KEYS)), 0.1)  # resumable: same order
    assert [k for k, r in plan_a if r == 0] != [k for k, r in protocol.plan(b, KEYS, 0.1)
                                                if r == 0]
    firsts = [k for k, r in plan_a if r == 0]
    assert sorted(firsts) == sorted(KEYS) and firsts != sorted(KEYS)
    repeats = [(i, k) for i, (k, r) in enumerate(plan_a) if r == 1]
    assert len(repeats) == math.ceil(0.1 * len(KEYS)) == 2
    for i, key in repeats:
        assert plan_a.index((key, 0)) < i
    assert protocol.plan(a, KEYS, 0.0) == [(k, 0) for k in firsts]
    assert len(protocol.plan(a, KEYS, 1.0)) == 2 * len(KEYS)


def test_the_next_entry_resumes_where_the_rater_stopped() -> None:
    entries = protocol.plan(token_digest("t"), KEYS[:5], 0.0)
    assert protocol.next_entry(entries, set()) == (0, entries[0])
    assert protocol.next_entry(entries, {entries[0], entries[2]}) == (1, entries[1])
    assert protocol.next_entry(entries, set(entries)) is None


def _pair(set_name: str, name: str, seed: int) -> protocol.ImagePair:
    rng = np.random.default_rng(seed)
    hr = rng.integers(0, 256, (16, 12, 3), dtype=np.uint8)
    return protocol.ImagePair(set_name, name, hr, hr[::4, ::4].copy())


def _chunks(png: bytes) -> list[bytes]:
    out, at = [], 8
    while at < len(png):
        length = int.from_bytes(png[at:at + 4], "big")
        out.append(png[at + 4:at + 8])
        at += 12 + length
    return out


def test_calibration_images_are_never_rated_and_every_version_is_blind() -> None:
    val = [_pair("va", "b", 1), _pair("va", "a", 2), _pair("va", "c", 3)]
    calibration = protocol.calibration_choice(val, 2)
    assert [p.name for p in calibration] == ["a", "b"]
    catalog = protocol.build_catalog(
        val, calibration, 4, {"srresnet": lambda lr: protocol.nearest_upscale(lr, 4) // 2,
                              "srgan": lambda lr: protocol.nearest_upscale(lr, 4) // 3},
        lambda lr: protocol.nearest_upscale(lr, 4) // 4)
    assert {k.image for k in catalog.rated} == {"c"}  # a and b calibrate
    assert sorted(k.method for k in catalog.rated) == sorted(BUILTIN_METHODS)
    assert [(lo.method, hi.method) for lo, hi in catalog.calibration] == [("nearest", "hr")] * 2
    for key, png in catalog.images.items():
        # Only pixels: no text, time, gamma or other chunk; all of HR's size, RGB.
        assert _chunks(png) == [b"IHDR", b"IDAT", b"IEND"], key
        image = Image.open(io.BytesIO(png))
        assert (image.size, image.mode, image.info) == ((12, 16), "RGB", {}), key
    hr = np.asarray(Image.open(io.BytesIO(catalog.images[Key("va", "c", "hr")])))
    assert np.array_equal(hr, val[2].hr)
    assert zlib.crc32(catalog.images[Key("va", "c", "nearest")]) != zlib.crc32(
        catalog.images[Key("va", "c", "hr")])


def test_nearest_neighbour_repeats_each_pixel_into_a_block() -> None:
    lr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    up = protocol.nearest_upscale(lr, 2)
    assert up.shape == (4, 6) and (up[2:4, 4:6] == 5).all() and (up[0:2, 0:2] == 0).all()


def test_a_version_of_the_wrong_size_is_refused() -> None:
    pair = _pair("te", "x", 0)
    with pytest.raises(ValueError, match="the srgan version is"):
        protocol.versions(pair, 4, {"srgan": lambda lr: lr}, lambda lr: np.repeat(
            np.repeat(lr, 4, 0), 4, 1))
