"""The prepare stage: modcrop + MATLAB-bicubic LR, written atomically as a whole."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from srcore import config
from srcore.data.degrade import bicubic_lr
from srcore.data.images import ImageError
from srcore.stages.check_data import MissingDataError
from srcore.stages.prepare import prepare
from tests.conftest import make_images, tiny_params_dict


def _params(**data: object) -> config.Params:
    return config.parse(tiny_params_dict(data={"train": ["a"], "val": ["v"], "test": ["b"],
                                               **data}))


def test_pairs_are_cropped_and_bicubic(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_images(data / "a", 2, size=(66, 51), grey=1)
    make_images(data / "v", 1, size=(40, 40), seed=2)
    make_images(data / "b", 1, size=(40, 40), seed=1)
    counts = prepare(_params(), data, tmp_path / "prepared")
    assert counts == {"a": 2, "v": 1, "b": 1}
    hr = np.asarray(Image.open(tmp_path / "prepared" / "a" / "HR" / "img01.png"))
    lr = np.asarray(Image.open(tmp_path / "prepared" / "a" / "LR" / "img01.png"))
    assert hr.shape == (48, 64, 3) and lr.shape == (12, 16, 3)  # 51x66 cropped to x4
    np.testing.assert_array_equal(lr, bicubic_lr(hr, 4))
    grey = np.asarray(Image.open(tmp_path / "prepared" / "a" / "HR" / "img00.png"))
    assert grey.ndim == 2  # grey stays grey for the field's evaluation
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert manifest == {"scale": 4, "sets": {"a": 2, "v": 1, "b": 1}}


def test_corrupt_image_names_the_file_and_keeps_old_output(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_images(data / "a", 2)
    make_images(data / "v", 1, seed=2)
    make_images(data / "b", 1)
    out = tmp_path / "prepared"
    prepare(_params(), data, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    bad = data / "a" / "img01.png"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated PNG
    with pytest.raises(ImageError, match="img01.png"):
        prepare(_params(), data, out)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]


def test_missing_dataset_says_to_download(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match="srgan download"):
        prepare(_params(), tmp_path / "data", tmp_path / "prepared")
