"""Tiled inference equals whole-image inference once tiles carry the receptive field; `srgan
upscale` turns files, folders and globs into PNGs and counts the inputs it could not use."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from srcore import cli, precision, serving
from srcore.data.images import list_images, load_image
from srcore.metrics import psnr_y
from srcore.models.interpolate import IncompatibleGenerators, blend
from srcore.models.srresnet import SRResNet
from srcore.serving import DEFAULT_TILE
from srcore.training.checkpoints import save_generator
from srcore.upscale import (
    Cancelled,
    GeneratorSet,
    MissingSRResNet,
    default_overlap,
    for_inference,
    image_bytes,
    lr_to_tensor,
    receptive_radius,
    tensor_to_image,
    tile_bytes,
    upscale_alpha,
    upscale_image,
    upscale_tensor,
)
from tests.conftest import SHARED_DATASETS

pytestmark = pytest.mark.usefixtures("one_thread")


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


# ------------------------------------------------------------- uint8 path, files, the CLI


def test_uint8_tiles_match_whole_image_within_a_thousandth() -> None:
    model = _model(blocks=6, channels=8)  # receptive radius 20: the default 16 is not exact
    assert default_overlap(model) == 16 < receptive_radius(model)
    rng = np.random.default_rng(3)
    for lr in (rng.integers(0, 256, (45, 38, 3), dtype=np.uint8),
               rng.integers(0, 256, (30, 41), dtype=np.uint8)):  # grey: luma out
        whole = upscale_image(model, lr, 4)
        assert whole.shape == (4 * lr.shape[0], 4 * lr.shape[1], *lr.shape[2:])
        tiled = upscale_image(model, lr, 4, tile=12, overlap=default_overlap(model))
        gap = np.abs(tiled.astype(np.float64) - whole).mean() / 255
        assert gap < 1e-3, gap
        # with the full radius only float rounding differs: a .5 flips, one level at most
        exact = upscale_image(model, lr, 4, tile=12, overlap=receptive_radius(model))
        assert np.abs(exact.astype(int) - whole).max() <= 1
        # and the uint8 path is the float path, quantised
        ref = tensor_to_image(upscale_tensor(model, lr_to_tensor(lr), 4), grey=lr.ndim == 2)
        np.testing.assert_array_equal(whole, ref)
    # without context the seams are visible: the check above can fail
    seams = upscale_image(model, lr, 4, tile=12, overlap=0)
    assert np.abs(seams.astype(np.float64) - whole).mean() / 255 > 1e-3


def assert_same_pixels(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to float rounding: channels_last (the CLI's default) may flip a .5."""
    assert got.shape == want.shape and got.dtype == want.dtype
    diff = np.abs(got.astype(int) - want)
    assert diff.max() <= 1 and diff.mean() < 1e-3, (diff.max(), diff.mean())


def _png(width: int, height: int) -> bytes:
    """A PNG header claiming width x height, with no pixel data (cheap to make, any size)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                              0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_cli_upscales_files_folders_and_globs_and_counts_the_bad_ones(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _model(blocks=1, channels=8)
    save_generator(model, tmp_path / "g.pt", {})
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    alpha = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    src, more = tmp_path / "in", tmp_path / "more"
    src.mkdir()
    more.mkdir()
    Image.fromarray(rgb).save(src / "rgb.png")
    Image.fromarray(grey).save(src / "grey.png")
    Image.fromarray(np.dstack([rgb, alpha])).save(src / "rgba.png")
    Image.fromarray(np.dstack([grey, alpha])).save(src / "grey_alpha.png")
    Image.fromarray(rgb).save(more / "photo.jpg", quality=95)
    Image.fromarray(rgb).save(more / "web.webp", lossless=True)
    (src / "notes.txt").write_text("not listed: folders give images only")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "text.png").write_text("not an image")
    full = (src / "rgb.png").read_bytes()
    (bad / "torn.png").write_bytes(full[: len(full) // 2])
    (bad / "empty.png").write_bytes(_png(0, 0))
    (bad / "huge.png").write_bytes(_png(3000, 2000))  # 6 MP header, over --max-pixels
    inputs = [str(src), str(more / "*.jpg"), str(more / "web.webp"), str(src / "rgb.png"),
              *(str(bad / n) for n in ("text.png", "torn.png", "empty.png", "huge.png")),
              str(tmp_path / "missing.png")]
    out = tmp_path / "out"
    code = cli.main(["upscale", *inputs, "-o", str(out), "--model", str(tmp_path / "g.pt"),
                     "--tile", "4", "--max-pixels", "1000000", "--precision", "fp32"])
    captured = capsys.readouterr()
    assert code == 5, captured
    written = sorted(p.name for p in out.iterdir())
    assert written == ["grey.png", "grey_alpha.png", "photo.png", "rgb.png", "rgba.png",
                       "web.png"]
    expect = upscale_image(model, rgb, 4)
    opened = {name: Image.open(out / name) for name in written}
    assert {n: im.mode for n, im in opened.items()} == {
        "grey.png": "L", "grey_alpha.png": "LA", "photo.png": "RGB", "rgb.png": "RGB",
        "rgba.png": "RGBA", "web.png": "RGB"}
    assert all(im.size == (40, 48) for im in opened.values())
    assert_same_pixels(np.asarray(opened["rgb.png"]), expect)
    assert_same_pixels(np.asarray(opened["web.png"]), expect)  # lossless WebP in
    rgba = np.asarray(opened["rgba.png"])
    assert_same_pixels(rgba[..., :3], expect)
    np.testing.assert_array_equal(rgba[..., 3], upscale_alpha(alpha, 4))
    grey_alpha = np.asarray(opened["grey_alpha.png"])
    np.testing.assert_array_equal(grey_alpha[..., 0], np.asarray(opened["grey.png"]))
    np.testing.assert_array_equal(grey_alpha[..., 1], upscale_alpha(alpha, 4))
    errors = captured.err
    assert "Traceback" not in errors
    for name, why in (("text.png", "cannot be decoded"), ("torn.png", "truncated"),
                      ("empty.png", "cannot be decoded"), ("huge.png", "over the limit"),
                      ("missing.png", "no such file")):
        line = next(ln for ln in errors.splitlines() if name in ln)
        assert why in line, line
    summary = captured.out.strip().splitlines()[-1]
    assert summary.startswith("srgan upscale: wrote 6 of 11 image(s)") and "5 failed" in summary


def test_pillow_bomb_guard_stays_on_and_outputs_never_clobber(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_generator(_model(blocks=1, channels=4), tmp_path / "g.pt", {})
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bomb.png").write_bytes(_png(20000, 20000))  # 400 MP: Pillow refuses
    rgb = np.zeros((6, 5, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "sub" / "a.jpg")
    Image.fromarray(rgb).save(tmp_path / "sub" / "a.webp")
    code = cli.main(["upscale", str(tmp_path / "sub" / "bomb.png"), str(tmp_path / "a.png"),
                     str(tmp_path / "sub" / "a.jpg"), str(tmp_path / "sub" / "a.webp"),
                     "-o", str(tmp_path), "--model", str(tmp_path / "g.pt"),
                     "--max-pixels", str(10**9)])
    err = capsys.readouterr().err
    assert code == 4, err
    # Pillow's guard still refuses 400 MP although --max-pixels allows it, in our words
    line = next(ln for ln in err.splitlines() if "bomb.png" in ln)
    assert "400,000,000 pixels is over Pillow's decompression-bomb limit" in line, line
    assert "--max-pixels does not raise" in line and "DOS attack" not in line
    # a.png, sub/a.jpg and sub/a.webp all map to ./a.png, which is an input itself
    assert err.count("would overwrite an input") == 3
    assert Image.open(tmp_path / "a.png").size == (5, 6)  # the input is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "g.pt", "sub"]


def test_cli_upscale_says_what_to_fix_for_a_missing_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["upscale", "x.png", "-o", "out"]) == 2  # models:/srgan@champion
    assert "no mlflow.db here" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()  # no empty store made as a side effect
    assert cli.main(["upscale", "x.png", "-o", "out", "--model", "nope.pt"]) == 2
    assert "nope.pt: missing" in capsys.readouterr().err
    (tmp_path / "taken").write_text("")
    assert cli.main(["upscale", "x.png", "-o", "taken", "--model", "nope.pt"]) == 2
    assert "-o takes a folder" in capsys.readouterr().err


# ------------------------------------------- precision, alpha, hostile inputs, cancellation


def _pair(folder: Path, channels: int = 8) -> tuple[SRResNet, SRResNet]:
    """An SRResNet and an 'SRGAN' of the same shape (other weights), saved side by side."""
    folder.mkdir(parents=True, exist_ok=True)
    srresnet, srgan = _model(1, channels, seed=0), _model(1, channels, seed=1)
    save_generator(srresnet, folder / "srresnet.pt", {})
    save_generator(srgan, folder / "srgan.pt", {})
    return srresnet, srgan


def _rgb(h: int = 12, w: int = 10, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_fp32_is_bit_exact_and_the_chosen_precision_is_said_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _model(blocks=1, channels=8)
    save_generator(model, tmp_path / "g.pt", {})
    rgb = _rgb()
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    common = ["upscale", str(tmp_path / "rgb.png"), "--model", str(tmp_path / "g.pt"),
              "--no-channels-last"]
    assert cli.main([*common, "-o", str(tmp_path / "fp32"), "--precision", "fp32"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "fp32" / "rgb.png")),
                                  upscale_image(model, rgb, 4))
    assert cli.main([*common, "-o", str(tmp_path / "auto")]) == 0
    said = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("upscale: ")]
    chosen = precision.resolve("auto", torch.device("cpu"))
    assert said == ["upscale: fp32 (fp32: asked for; bit-exact across machines)",
                    f"upscale: {chosen.describe()}"]
    auto = np.asarray(Image.open(tmp_path / "auto" / "rgb.png"))
    np.testing.assert_array_equal(
        auto, upscale_image(for_inference(model, chosen), rgb, 4, precision=chosen))
    # bf16 (where it is native) moves pixels by a level or two, no more
    assert np.abs(auto.astype(int) - upscale_image(model, rgb, 4)).max() <= 3


def test_cli_precision_choices_are_the_resolvers() -> None:
    assert serving.PRECISIONS == precision.SETTINGS


def test_alpha_blends_the_srgan_with_the_srresnet_beside_it(tmp_path: Path) -> None:
    srresnet, srgan = _pair(tmp_path / "models")
    rgb = _rgb()
    Image.fromarray(rgb).save(tmp_path / "rgb.png")

    def run(*extra: str) -> np.ndarray:
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        assert cli.main(["upscale", str(tmp_path / "rgb.png"), "-o", str(out), "--model",
                         str(tmp_path / "models" / "srgan.pt"), "--precision", "fp32",
                         "--no-channels-last", *extra]) == 0
        return np.asarray(Image.open(out / "rgb.png"))

    np.testing.assert_array_equal(run("--alpha", "0.5"),
                                  upscale_image(blend(srresnet, srgan, 0.5), rgb, 4))
    np.testing.assert_array_equal(run("--alpha", "0"), upscale_image(srresnet, rgb, 4))
    np.testing.assert_array_equal(run("--alpha", "1"), upscale_image(srgan, rgb, 4))
    np.testing.assert_array_equal(run(), upscale_image(srgan, rgb, 4))  # no --alpha: as before
    elsewhere = tmp_path / "elsewhere.pt"
    (tmp_path / "models" / "srresnet.pt").rename(elsewhere)
    np.testing.assert_array_equal(run("--alpha", "0.25", "--srresnet", str(elsewhere)),
                                  upscale_image(blend(srresnet, srgan, 0.25), rgb, 4))


def test_alpha_without_a_fitting_srresnet_is_one_clear_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the CLI records its error in ./.srgan
    _pair(tmp_path / "a", channels=8)
    _pair(tmp_path / "b", channels=4)
    Image.fromarray(_rgb()).save(tmp_path / "rgb.png")
    out = tmp_path / "out"

    def run(*extra: str) -> tuple[int, str]:
        code = cli.main(["upscale", str(tmp_path / "rgb.png"), "-o", str(out), *extra])
        return code, capsys.readouterr().err

    code, err = run("--model", str(tmp_path / "a" / "srgan.pt"), "--alpha", "0.5",
                    "--srresnet", str(tmp_path / "b" / "srresnet.pt"))
    assert code == 2 and "cannot be blended" in err and "shape" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    (tmp_path / "a" / "srresnet.pt").unlink()
    code, err = run("--model", str(tmp_path / "a" / "srgan.pt"), "--alpha", "0.5")
    assert code == 2 and f"{tmp_path / 'a' / 'srresnet.pt'}: missing" in err, err
    assert "--srresnet" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        run("--model", str(tmp_path / "b" / "srgan.pt"), "--alpha", "1.5")
    assert exit_info.value.code == 2 and "must be a number from 0 to 1" in capsys.readouterr().err
    assert not out.exists()  # nothing written by any of them


def test_a_decompression_bomb_gets_the_max_pixels_hint_not_pillows_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_generator(_model(blocks=1, channels=4), tmp_path / "g.pt", {})
    (tmp_path / "bomb.png").write_bytes(_png(20000, 20000))  # 400 MP, over Pillow's limit
    code = cli.main(["upscale", str(tmp_path / "bomb.png"), "-o", str(tmp_path / "out"),
                     "--model", str(tmp_path / "g.pt")])
    err = capsys.readouterr().err
    assert code == 1, err
    line = next(ln for ln in err.splitlines() if "bomb.png" in ln)
    assert "400,000,000 pixels is over the limit of 16,777,216" in line, line
    assert "--max-pixels" in line and "DOS attack" not in line


def _diverged(model: SRResNet, value: float) -> SRResNet:
    with torch.no_grad():
        model.head[0].weight.fill_(value)
    return model


def test_a_diverged_generator_is_refused_never_written_black(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the CLI records its error in ./.srgan
    Image.fromarray(_rgb()).save(tmp_path / "rgb.png")
    save_generator(_diverged(_model(1, 8), float("nan")), tmp_path / "nan.pt", {})
    out = tmp_path / "out"
    code = cli.main(["upscale", str(tmp_path / "rgb.png"), "-o", str(out), "--model",
                     str(tmp_path / "nan.pt")])
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path / 'nan.pt'}:" in err and "diverged" in err, err
    assert "head.0.weight" in err and len(err.strip().splitlines()) == 1
    # finite weights whose output overflows: refused at the first tile, named by the model
    save_generator(_diverged(_model(1, 8), 3e38), tmp_path / "huge.pt", {})
    code = cli.main(["upscale", str(tmp_path / "rgb.png"), "-o", str(out), "--model",
                     str(tmp_path / "huge.pt"), "--precision", "fp32"])
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path / 'huge.pt'}: " in err and "diverged" in err, err
    assert not out.exists() or not any(out.iterdir())


def test_work_stops_between_tiles_when_the_hook_says_so() -> None:
    model = _model(blocks=1, channels=4)
    seen: list[int] = []

    def hook() -> None:
        seen.append(1)
        if len(seen) == 3:
            raise Cancelled("client gone")

    with pytest.raises(Cancelled, match="client gone"):
        upscale_image(model, _rgb(40, 40), 4, tile=8, overlap=2, before_tile=hook)
    assert len(seen) == 3  # of 25 tiles


def test_blends_are_made_once_and_kept_in_a_small_lru() -> None:
    srresnet, srgan = _model(1, 4, seed=0), _model(1, 4, seed=1)
    generators = GeneratorSet(srgan, srresnet, source="test", cache_size=2)
    assert generators.at(None) is srgan and generators.at(1) is srgan
    assert generators.at(0) is srresnet
    half = generators.at(0.5)
    assert generators.at(0.5) is half and generators.blends_made == 1
    generators.at(0.25)
    generators.at(0.75)  # evicts 0.5, the least recently used
    assert generators.at(0.5) is not half and generators.blends_made == 4
    for bad in (float("nan"), -0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="alpha must be a number"):
            generators.at(bad)  # type: ignore[arg-type]
    alone = GeneratorSet(srgan, None, source="srgan.pt")
    with pytest.raises(MissingSRResNet, match="srgan.pt: alpha 0.5"):
        alone.at(0.5)
    with pytest.raises(IncompatibleGenerators, match="cannot be blended"):
        GeneratorSet(srgan, _model(1, 8), source="mixed")


BIG_CHILD = """
import json, sys
from srcore import cli
from srcore.server import peak_rss_bytes as peak
args = sys.argv[1:]
assert cli.main(["upscale", args[1], "-o", args[2] + "-warm", *args[3:]]) == 0  # warm baseline
baseline = peak()
code = cli.main(["upscale", args[0], "-o", args[2], *args[3:]])
print(json.dumps({"code": code, "baseline": baseline, "peak": peak()}))
"""


def test_alpha_on_a_4000x3000_image_stays_within_the_tiling_memory_bound(
        tmp_path: Path) -> None:
    """The whole CLI path (decode, blend, tiles, encode) on 12 MP, in a child process whose
    peak RSS is read back. A scale-2 micro generator keeps it within seconds on 2 cores; the
    paper-size x4 figure is measured by benchmarks/upscale.py --memory (README)."""
    torch.manual_seed(0)
    pair = [SRResNet(blocks=1, channels=2, scale=2, global_skip=False).eval()
            for _ in range(2)]
    save_generator(pair[0], tmp_path / "srresnet.pt", {})
    save_generator(pair[1], tmp_path / "srgan.pt", {})
    h, w = 3000, 4000
    yy, xx = np.mgrid[0:h, 0:w]
    big = np.stack([(np.sin(xx / (40 + 9 * c)) * np.cos(yy / 33) + 1) * 127.5
                    for c in range(3)], -1).astype(np.uint8)
    Image.fromarray(big).save(tmp_path / "big.png")
    Image.fromarray(big[:64, :64]).save(tmp_path / "small.png")
    del big, yy, xx
    child = subprocess.run(
        [sys.executable, "-c", BIG_CHILD, str(tmp_path / "big.png"), str(tmp_path / "small.png"),
         str(tmp_path / "out"), "--model", str(tmp_path / "srgan.pt"), "--alpha", "0.5",
         "--format", "jpeg"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    with Image.open(tmp_path / "out" / "big.jpg") as im:
        assert im.size == (8000, 6000)
    bound = (tile_bytes(pair[1], DEFAULT_TILE, default_overlap(pair[1]))
             + image_bytes(h * w, 2, encoded_in_memory=False))
    grew = result["peak"] - result["baseline"]
    print(f"4000x3000 x2 --alpha 0.5: peak RSS {result['peak'] / 2**20:.0f} MiB, "
          f"{grew / 2**20:.0f} MiB over the warm baseline; bound {bound / 2**20:.0f} MiB")
    assert grew < bound


def test_for_inference_folds_batchnorm_only_off_the_bit_exact_fp32_path() -> None:
    model = _model(blocks=2, channels=8).train()
    fp32, bf16 = (precision.resolve(p, torch.device("cpu")) for p in ("fp32", "bf16"))
    assert for_inference(model, fp32) is model and for_inference(model, None) is model
    ready = for_inference(model, bf16, torch.channels_last)
    assert model.training and not ready.training  # a copy, the caller's model untouched
    kinds = {type(m) for m in ready.modules()}
    assert torch.nn.BatchNorm2d not in kinds and type(ready.tail) is torch.nn.Conv2d
    assert ready.head[0].weight.is_contiguous(memory_format=torch.channels_last)
    lr = torch.rand(1, 3, 13, 11)
    with torch.no_grad():
        torch.testing.assert_close(ready(lr), model.eval()(lr), atol=2e-5, rtol=0)
