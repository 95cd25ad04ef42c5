"""Image decoding: odd formats are converted, broken files refused with the file's name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from srcore.data.images import ImageError, load_image, save_png


def test_grey_rgb_rgba_palette_and_16bit_are_converted(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    Image.fromarray(np.dstack([rgb, np.full((9, 7), 128, np.uint8)])).save(tmp_path / "a.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(tmp_path / "deep.png")

    np.testing.assert_array_equal(load_image(tmp_path / "rgb.png"), rgb)
    assert load_image(tmp_path / "grey.png").shape == (9, 7)
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), rgb)  # alpha dropped
    assert load_image(tmp_path / "pal.png").shape == (9, 7, 3)
    deep = load_image(tmp_path / "deep.png")
    assert deep.dtype == np.uint8
    np.testing.assert_array_equal(deep, rgb[..., 1])  # 16-bit scaled back to 8-bit exactly


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n\0\0"])
def test_broken_files_name_the_file(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(content)
    with pytest.raises(ImageError, match="broken.png"):
        load_image(bad)


def test_truncated_png_is_refused(tmp_path: Path) -> None:
    img = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / "t.png"
    Image.fromarray(img).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageError, match="t.png"):
        load_image(path)


def test_save_png_is_atomic(tmp_path: Path) -> None:
    img = np.zeros((4, 4, 3), np.uint8)
    save_png(img, tmp_path / "sub" / "x.png")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.png"]
