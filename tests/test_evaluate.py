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
from srcore.data.datasets import Pair, load_pairs
from srcore.data.degrade import imresize
from srcore.data.images import load_image
from srcore.metrics import psnr_y, ssim_daala_y, ssim_y
from srcore.models.srresnet import SRResNet
from srcore.stages.prepare import prepare
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
    # Two 96x96 NIQE blocks after the 4-pixel crop: NIQE is defined on the val set, not on
    # tiny2's small images.
    make_images(data / "tiny", 3, size=(200, 104), seed=0, grey=1)
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
    blends = {"alpha_0.25", "alpha_0.5", "alpha_0.75"}  # params.yaml's evaluate.alphas
    full_reference = {"psnr_y", "ssim_y", "ssim_daala_y"}
    assert set(summary["tiny"]) == {"bicubic", "srresnet", "srgan", "hr", *blends}
    assert set(summary["tiny"]["hr"]) == {"niqe"}  # HR: naturalness only, no distortion
    for method in ("bicubic", "srresnet", "srgan", *blends):
        assert set(summary["tiny"][method]) == {*full_reference, "niqe"}
        assert set(summary["tiny2"][method]) == full_reference  # NIQE undefined: left out
    assert "hr" not in summary["tiny2"]
    per_image = pd.read_csv(plot)
    assert list(per_image.columns) == ["set", "image", "method", "psnr_y", "ssim_y",
                                       "ssim_daala_y", "niqe"]
    assert len(per_image) == (3 + 2) * 7
    assert "NaN" not in metrics.read_text()
    points = pd.read_csv(plot.with_name("perception_distortion.csv"))
    tiny = points[points.set == "tiny"].set_index("method")
    assert list(tiny.index) == ["bicubic", "srresnet", *sorted(blends), "srgan", "hr"]
    assert list(tiny["alpha"].dropna()) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert tiny.loc["alpha_0.5", "niqe"] == summary["tiny"]["alpha_0.5"]["niqe"]
    assert (tmp_path / "reports" / "perception_distortion_tiny.png").is_file()
    assert "NIQE is undefined for 2 of 2 tiny2" in capsys.readouterr().err
    # Bicubic numbers are the metric functions on MATLAB imresize of the LR, nothing else.
    hr = load_image(prepared / "val" / "tiny" / "HR" / "img01.png")
    lr = load_image(prepared / "val" / "tiny" / "LR" / "img01.png")
    row = per_image[(per_image.image == "img01") & (per_image.method == "bicubic")].iloc[0]
    sr = imresize(lr, 4.0)
    for name, fn in (("psnr_y", psnr_y), ("ssim_y", ssim_y), ("ssim_daala_y", ssim_daala_y)):
        assert row[name] == pytest.approx(fn(sr, hr, 4), abs=1e-4), name
    assert summary["tiny"]["bicubic"]["ssim_daala_y"] != summary["tiny"]["bicubic"]["ssim_y"]
    assert [g.name for g in grids] == ["grid_tiny.png", "grid_tiny2.png",
                                       "perception_distortion_tiny.png"]
    assert all(g.is_file() for g in grids)


def test_missing_lpips_is_noted_once_and_evaluation_goes_on(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert set(evaluate.metric_functions()) == {"psnr_y", "ssim_y", "ssim_daala_y"}
    assert set(evaluate.metric_functions()) == {"psnr_y", "ssim_y", "ssim_daala_y"}
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


def test_detail_box_finds_where_srresnet_and_srgan_differ_most() -> None:
    rng = np.random.default_rng(0)
    srresnet = np.full((64, 80, 3), 120, np.uint8)
    srresnet[2:18, 2:18] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # edges in both
    srgan = srresnet.copy()
    srgan[40:56, 50:70] = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)  # invented texture
    y, x = evaluate.detail_box(srresnet, srgan, 16, 20)
    assert (y, x) == (40, 50)
    assert evaluate.detail_box(srresnet[..., 0], srgan[..., 0], 16, 20) == (y, x)  # grey too
    # Identical outputs: the window with the most gradient energy instead of a corner.
    assert evaluate.detail_box(srresnet, srresnet, 16, 16) == (2, 2)


def test_grid_zooms_the_same_window_in_every_tile_and_fills_the_cell() -> None:
    rng = np.random.default_rng(1)
    hr = np.full((32, 40, 3), 90, np.uint8)
    hr[4:12, 20:30] = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
    pair = Pair("x", hr, imresize(hr, 0.25))
    srresnet = hr.copy()
    srgan = hr.copy()
    srgan[20:28, 4:14] = 255 - srgan[20:28, 4:14]  # where the two models differ
    images = {"bicubic": [hr.copy()], "srresnet": [srresnet], "srgan": [srgan]}
    grid = evaluate.comparison_grid([pair], images, 4, count=1, pad=4)
    zoom = evaluate.DETAIL_ZOOM
    bh, bw = 32 // zoom, 40 // zoom
    label = 14
    assert grid.shape == (label + 32 + 4 + bh * zoom + 4, 5 * (40 + 4), 3)
    by, bx = evaluate.detail_box(srresnet, srgan, bh, bw)
    assert (by, bx) == (20, 4)
    top = label + 32 + 4
    for col, tile in ((1, hr), (2, srresnet), (3, srgan), (4, hr)):
        left = col * 44
        expected = np.kron(tile[by:by + bh, bx:bx + bw], np.ones((zoom, zoom, 1), np.uint8))
        assert expected.shape[:2] == (32, 40)  # the zoom fills the tile's cell, no padding
        np.testing.assert_array_equal(grid[top:top + 32, left:left + 40], expected)
        assert (grid[label + by, left + bx:left + bx + bw] == [255, 0, 0]).all()  # outline


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
    "sample_val": {"bicubic": {"psnr_y": 26.0, "ssim_y": 0.70, "ssim_daala_y": 0.72,
                               "niqe": 7.5},
                   "srresnet": {"psnr_y": 27.5, "ssim_y": 0.76, "ssim_daala_y": 0.78,
                                "niqe": 6.7},
                   "alpha_0.5": {"psnr_y": 27.3, "ssim_y": 0.75, "ssim_daala_y": 0.77,
                                 "niqe": 6.1},
                   "srgan": {"psnr_y": 27.0, "ssim_y": 0.74, "ssim_daala_y": 0.76,
                             "niqe": 5.4},
                   "hr": {"niqe": 4.9}},
    "Set14": {"srresnet": {"psnr_y": 28.0, "ssim_y": 0.78, "ssim_daala_y": 0.80, "niqe": 6.0}},
}


def test_benchmark_table_shows_distortion_and_naturalness_and_the_alpha_curve() -> None:
    text = report.table(SUMMARY)
    assert ("| set | method | PSNR-Y (dB) | SSIM-Y (Wang) | SSIM-Y (daala) | NIQE ↓ |"
            in text)
    assert "| sample_val | srgan | 27.00 | 0.7400 | 0.7600 | 5.40 |" in text
    assert "| sample_val | hr | - | - | - | 4.90 |" in text
    assert "alpha_0.5 |" not in text.split("Perception-distortion")[0]  # blends: own table
    assert ("| sample_val | 26.00 / 7.50 | 27.50 / 6.70 | 27.30 / 6.10 | 27.00 / 5.40 | "
            "- / 4.90 |") in text
    assert "SRResNet α=0 | α=0.5 | SRGAN α=1 | HR |" in text


def test_report_sets_our_numbers_beside_table_2_like_for_like() -> None:
    frame = report.comparison_frame(SUMMARY)
    row = frame[frame.set == "Set14"].iloc[0]  # set names match case-insensitively
    assert (row["paper PSNR"], row["paper SSIM (daala)"]) == (28.49, 0.8184)
    assert row["Δ PSNR"] == pytest.approx(-0.49)
    assert row["Δ SSIM (daala)"] == pytest.approx(0.80 - 0.8184)  # daala against daala
    assert (row["NIQE ↓"], row["paper MOS ↑"]) == (6.0, 2.98)  # beside, never subtracted
    text = report.markdown(frame)
    assert ("| Set14 | srresnet | 28.00 | 28.49 | -0.49 | 0.8000 | 0.8184 | -0.0184 | 6.00 | "
            "2.98 | - |") in text
    assert "| sample_val | bicubic | 26.00 | - | - | 0.7200 | - | - | 7.50 | - | - |" in text
    published = report.comparison_frame({"BSD100": {"srgan": {"psnr_y": 25.0, "niqe": 3.5}}})
    assert published["published PI ↓"].item() == "2.35 (EUSR-PCL)"
    assert "hr" not in set(frame["method"])


def test_srgan_report_reads_metrics_json(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--root", str(tmp_path), "report"]) == 2
    assert "run `srgan evaluate`" in capsys.readouterr().err
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluate.json").write_text(json.dumps(SUMMARY))
    assert cli.main(["--root", str(tmp_path), "report"]) == 0
    out = capsys.readouterr().out
    assert "| Set14 | srresnet | 28.00 |" in out and "daala" in out and "MOS" in out
    assert "paper columns are empty" not in out
    only_val = {"sample_val": SUMMARY["sample_val"]}
    (tmp_path / "metrics" / "evaluate.json").write_text(json.dumps(only_val))
    assert cli.main(["--root", str(tmp_path), "report"]) == 0
    # The default profile says how to fill the paper's columns instead of printing dashes only.
    assert "srgan params apply configs/shared-benchmarks.yaml" in capsys.readouterr().out


def test_evaluation_runs_at_the_chosen_precision(tmp_path: Path) -> None:
    """fp32 is the exact reference; bf16 (auto's choice where it is native) stays within a few
    hundredths of a dB of it, and is what the caller asked for, not whatever the CPU does."""
    from srcore.precision import Precision
    from srcore.upscale import upscale_image

    params, prepared = _prepared(tmp_path)
    generators = {"srresnet": _generator(0), "srgan": _generator(1)}
    runs = {}
    for name in ("fp32", "bf16"):
        out = tmp_path / name
        runs[name], _ = evaluate.evaluate(
            params, prepared, generators, out / "evaluate.json", out / "evaluate.csv",
            out / "reports", Precision(name, name, "test"))  # type: ignore[arg-type]
    pair = load_pairs(prepared / "val", "tiny", 4)[0]
    with torch.inference_mode():
        exact = upscale_image(_generator(0), pair.lr, 4)
    per_image = pd.read_csv(tmp_path / "fp32" / "evaluate.csv")
    row = per_image[(per_image.image == pair.name) & (per_image.method == "srresnet")].iloc[0]
    assert row["psnr_y"] == pytest.approx(psnr_y(exact, pair.hr, 4), abs=1e-4)
    for set_name in ("tiny", "tiny2"):
        fp32, bf16 = runs["fp32"][set_name], runs["bf16"][set_name]
        for method in ("srresnet", "alpha_0.5", "srgan"):
            assert bf16[method]["psnr_y"] == pytest.approx(fp32[method]["psnr_y"], abs=0.05)
        assert bf16["bicubic"] == fp32["bicubic"]  # bicubic never runs the network
