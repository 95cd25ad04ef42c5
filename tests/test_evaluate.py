"""Benchmark evaluation: both SSIMs, optional LPIPS, detail-crop grids, the paper table."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from srcore import cli, config, evaluate, report
from srcore.data.datasets import Pair
from srcore.data.degrade import imresize
from srcore.data.images import load_image
from srcore.data.prepare import prepare
from srcore.metrics import psnr_y, ssim_daala_y, ssim_y
from srcore.models.srresnet import SRResNet
from tests.conftest import make_images, tiny_params_dict


@pytest.fixture(autouse=True)
def fresh_lpips_probe(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """LPIPS availability is probed once per process; each test starts from a clean probe,
    with `lpips` made unimportable unless the test installs its own."""
    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips -> ImportError
    evaluate.lpips_scorer.cache_clear()
    yield
    evaluate.lpips_scorer.cache_clear()


def _generator(seed: int) -> SRResNet:
    torch.manual_seed(seed)
    return SRResNet(blocks=1, channels=8, scale=4, global_skip=True).eval()


def _prepared(tmp_path: Path, **sections: dict) -> tuple[config.Params, Path]:
    data = tmp_path / "data"
    make_images(data / "train", 2, size=(64, 64), seed=3)
    make_images(data / "tiny", 3, size=(64, 48), seed=0, grey=1)
    make_images(data / "tiny2", 2, size=(48, 56), seed=1)
    params = config.parse(tiny_params_dict(
        data={"train": ["train"], "val": ["tiny"], "test": ["tiny2"]}, **sections))
    prepare(params, data, tmp_path / "prepared")
    return params, tmp_path / "prepared"


def test_evaluate_reports_psnr_and_both_ssims_and_notes_missing_lpips_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params, prepared = _prepared(tmp_path)
    metrics, plot = tmp_path / "metrics" / "evaluate.json", tmp_path / "plots" / "evaluate.csv"
    summary, grids = evaluate.evaluate(
        params, prepared, {"srresnet": _generator(0), "srgan": _generator(1)},
        metrics, plot, tmp_path / "reports")

    assert json.loads(metrics.read_text()) == summary
    assert set(summary) == {"tiny", "tiny2"}
    for methods in summary.values():
        assert set(methods) == {"bicubic", "srresnet", "srgan"}
        for values in methods.values():
            assert set(values) == {"psnr_y", "ssim_y", "ssim_daala_y"}
    per_image = pd.read_csv(plot)
    assert list(per_image.columns) == ["set", "image", "method", "psnr_y", "ssim_y",
                                       "ssim_daala_y"]
    assert len(per_image) == (3 + 2) * 3
    # Bicubic numbers are the metric functions on MATLAB imresize of the LR, nothing else.
    hr = load_image(prepared / "tiny" / "HR" / "img01.png")
    lr = load_image(prepared / "tiny" / "LR" / "img01.png")
    row = per_image[(per_image.image == "img01") & (per_image.method == "bicubic")].iloc[0]
    sr = imresize(lr, 4.0)
    for name, fn in (("psnr_y", psnr_y), ("ssim_y", ssim_y), ("ssim_daala_y", ssim_daala_y)):
        assert row[name] == pytest.approx(fn(sr, hr, 4), abs=1e-4), name
    assert summary["tiny"]["bicubic"]["ssim_daala_y"] != summary["tiny"]["bicubic"]["ssim_y"]
    assert [g.name for g in grids] == ["grid_tiny.png", "grid_tiny2.png"]
    assert all(g.is_file() for g in grids)
    err = capsys.readouterr().err
    assert err.count("LPIPS skipped") == 1 and "`lpips` package is not installed" in err


def test_lpips_joins_the_metrics_when_package_and_weights_are_local(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, ...]] = []

    class FakeLPIPS(torch.nn.Module):
        def __init__(self, net: str, verbose: bool) -> None:
            super().__init__()
            assert net == "alex"

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(a.shape))
            assert a.min() >= -1 and a.max() <= 1
            return (a - b).abs().mean().reshape(1, 1, 1, 1)

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert evaluate.lpips_scorer() is None  # weights absent: never downloads
    evaluate.lpips_scorer.cache_clear()
    weights = tmp_path / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"present")
    assert set(evaluate.metric_functions()) == {"psnr_y", "ssim_y", "ssim_daala_y", "lpips"}
    img = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    score = evaluate.metric_functions()["lpips"]
    assert score(img, img, 4) == 0.0
    assert score(img[..., 0], 255 - img[..., 0], 4) > 0  # grey images go in as RGB
    assert seen[0] == (1, 3, 16, 12)  # border crop applied


def test_detail_box_finds_the_region_with_the_most_gradient_energy() -> None:
    img = np.full((64, 64, 3), 120, np.uint8)
    rng = np.random.default_rng(0)
    img[40:56, 8:24] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    y, x = evaluate.detail_box(img, 16)
    assert abs(y - 40) <= 1 and abs(x - 8) <= 1
    assert evaluate.detail_box(img[..., 0], 16) == (y, x)  # grey works the same


def test_grid_places_the_same_zoomed_detail_under_every_tile() -> None:
    rng = np.random.default_rng(1)
    hr = np.full((32, 40, 3), 90, np.uint8)
    hr[4:12, 20:28] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    pair = Pair("x", hr, imresize(hr, 0.25))
    images = {m: [hr.copy()] for m in evaluate.METHODS}
    grid = evaluate.comparison_grid([pair], images, 4, count=1, pad=4)
    size, zoom = 32 // evaluate.DETAIL_ZOOM, evaluate.DETAIL_ZOOM
    label = 14
    assert grid.shape == (label + 32 + 4 + size * zoom + 4, 5 * (40 + 4), 3)
    by, bx = evaluate.detail_box(hr, size)
    expected = np.kron(hr[by:by + size, bx:bx + size], np.ones((zoom, zoom, 1), np.uint8))
    top = label + 32 + 4
    for col in range(1, 5):  # bicubic, srresnet, srgan, HR tiles all show the HR crop here
        left = col * 44
        np.testing.assert_array_equal(grid[top:top + size * zoom, left:left + size * zoom],
                                      expected)
        assert (grid[label + by, left + bx:left + bx + size] == [255, 0, 0]).all()  # outline


def test_gate_set_defaults_to_the_first_validation_set_and_never_reads_a_test_set() -> None:
    data = {"train": ["a"], "val": ["v", "w"], "test": ["b", "c"]}
    params = config.parse(tiny_params_dict(data=data))
    assert evaluate.gate_set(params) == "v"
    raw = tiny_params_dict(data=data)
    raw["tracking"]["gate_set"] = "w"
    assert evaluate.gate_set(config.parse(raw)) == "w"
    for bad in ("b", "set99"):  # a test set is refused like an unknown name
        raw["tracking"]["gate_set"] = bad
        with pytest.raises(config.ConfigError,
                           match=r"tracking.*gate_set '" + bad + r"'.*\['v', 'w'\] \(data\.val\)"):
            config.parse(raw)


def test_short_tile_overlap_is_called_out_with_the_value_that_makes_tiling_exact(
        capsys: pytest.CaptureFixture[str]) -> None:
    params = config.parse(tiny_params_dict(evaluate={"tile": 16, "tile_overlap": 4}))
    evaluate.warn_if_overlap_short({"srresnet": _generator(0)}, params)
    err = capsys.readouterr().err
    assert "evaluate.tile_overlap=4" in err and "evaluate.tile_overlap: 10" in err


SUMMARY = {
    "Set14": {"srresnet": {"psnr_y": 28.0, "ssim_y": 0.78, "ssim_daala_y": 0.80}},
    "sample_test": {"bicubic": {"psnr_y": 24.5, "ssim_y": 0.7, "ssim_daala_y": 0.72}},
}


def test_report_sets_our_numbers_beside_table_2_like_for_like() -> None:
    frame = report.comparison_frame(SUMMARY)
    row = frame[frame.set == "Set14"].iloc[0]  # set names match case-insensitively
    assert (row["paper PSNR"], row["paper SSIM (daala)"]) == (28.49, 0.8184)
    assert row["Δ PSNR"] == pytest.approx(-0.49)
    assert row["Δ SSIM (daala)"] == pytest.approx(0.80 - 0.8184)  # daala against daala
    text = report.table(SUMMARY)
    assert "SSIM-Y (Wang)" in text and "SSIM-Y (daala)" in text
    assert ("| Set14 | srresnet | 28.00 | 0.7800 | 0.8000 | 28.49 | 0.8184 | -0.49 | -0.0184 |"
            in text)
    assert "| sample_test | bicubic | 24.50 | 0.7000 | 0.7200 | - | - | - | - |" in text


def test_srgan_report_reads_metrics_json(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--root", str(tmp_path), "report"]) == 2
    assert "run `srgan evaluate`" in capsys.readouterr().err
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluate.json").write_text(json.dumps(SUMMARY))
    assert cli.main(["--root", str(tmp_path), "report"]) == 0
    out = capsys.readouterr().out
    assert "| Set14 | srresnet | 28.00 |" in out and "daala" in out
