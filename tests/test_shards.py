"""The streaming prepared format of training sets (srcore.data.shards): the batches equal
those of the decoded images, prepare finds nested class folders, skips images too small with
a count, and a prepare killed with SIGKILL resumes without redoing its finished shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from srcore import config
from srcore.data.datasets import Pair, RandomCropBatches, open_train_set
from srcore.data.degrade import bicubic_lr, modcrop
from srcore.data.images import ImageError, list_images_tree, load_image
from srcore.data.manifest import write_manifest
from srcore.data.shards import ShardFormatError, ShardSet, write_set
from srcore.layout import Layout
from srcore.stages import check_data, hash_data
from srcore.stages.prepare import prepare
from srcore.training.loop import batches
from tests.conftest import REPO, make_images, tiny_params_dict


def _textured(folder: Path, sizes: list[tuple[int, int]], seed: int = 0,
              grey: tuple[int, ...] = ()) -> list[Path]:
    """Images with texture and flat areas (so min_crop_std redraws happen)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img[: h // 2, : w // 2] = 90  # a flat quarter
        path = folder / f"im{i:02d}.png"
        Image.fromarray(img[..., 0] if i in grey else img).save(path)
        paths.append(path)
    return paths


def _write(src: Path, out: Path, **kw: object) -> tuple[int, list, dict]:
    args: dict = {"scale": 4, "sigma": None, "min_hr_side": 32, "shard_mb": 0.02,
                  "name": "s", "processes": 1, "progress": False}
    args.update(kw)
    return write_set(src, out, out.parent / "work", **args)


def test_shard_batches_are_the_batches_of_the_decoded_images(tmp_path: Path) -> None:
    # Odd sizes (modcropped), a grey image, one too small: skipped, with its path.
    paths = _textured(tmp_path / "src", [(70, 53), (96, 64), (41, 90), (20, 200), (64, 64)],
                      grey=(2,))
    logged: list[str] = []
    stored, skipped, _ = _write(tmp_path / "src", tmp_path / "set", log=logged.append)
    assert stored == 4 and [p.path for p in skipped] == [paths[3]]
    assert "skipped 1 of 5 images" in logged[0] and "im03.png" in logged[0]
    shards = ShardSet(tmp_path / "set", 4)
    assert len(shards.shard_files) > 1  # 0.02 MB shards: several
    pairs = []
    for path in [p for i, p in enumerate(paths) if i != 3]:
        hr = modcrop(load_image(path), 4)
        pairs.append(Pair(path.stem, hr, bicubic_lr(hr, 4)))
    for k, pair in enumerate(pairs):
        hr, lr = shards.image(k)
        np.testing.assert_array_equal(hr.squeeze(-1) if pair.hr.ndim == 2 else hr, pair.hr)
        np.testing.assert_array_equal(lr.squeeze(-1) if pair.lr.ndim == 2 else lr, pair.lr)
    for sampling, min_std, part in (("pixel", 0.0, (0, 1)), ("image", 60.0, (0, 1)),
                                    ("image", 60.0, (1, 2))):
        kw = dict(batch_size=6, hr_crop=32, scale=4, seed=3, augment=True, sampling=sampling,
                  min_std=min_std, part=part)
        from_shards = RandomCropBatches(shards, **kw)
        decoded = RandomCropBatches(pairs, **kw)
        for i in range(5):
            for a, b in zip(from_shards[i], decoded[i], strict=True):
                assert torch.equal(a, b)
    assert len(RandomCropBatches(pairs, 6, 32, 4, 3, True, min_std=60.0).keys) == 4


def test_loader_workers_open_their_own_files_and_resume_sees_the_same_batches(
        tmp_path: Path) -> None:
    _textured(tmp_path / "src", [(64, 64), (96, 80), (72, 128)])
    _write(tmp_path / "src", tmp_path / "set")
    params = config.parse(tiny_params_dict(pretrain={"iterations": 6, "batch_size": 4}))
    cfg, cpu = params.pretrain, torch.device("cpu")
    shards = ShardSet(tmp_path / "set", 4)
    shards.lr_crop(0, 0, 0, 8)  # the parent has descriptors open before the fork
    serial = list(batches(params, cfg, shards, 0, cpu))
    resumed = list(batches(params, cfg, shards, 4, cpu))
    workers = params.model_copy(update={"runtime": params.runtime.model_copy(
        update={"num_workers": 2})})
    parallel = list(batches(workers, cfg, shards, 0, cpu))
    for (a, b), (c, d) in [*zip(serial[4:], resumed, strict=True),
                           *zip(serial, parallel, strict=True)]:
        assert torch.equal(a, c) and torch.equal(b, d)


def test_a_tree_of_nested_class_folders_is_found(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_images(data / "imagenet" / "n01440764", 2, size=(64, 48))
    make_images(data / "imagenet" / "n01443537" / "deeper", 1, size=(48, 64), seed=1)
    Image.new("RGB", (64, 64)).save(data / "imagenet" / "top.jpg")
    (data / "imagenet" / ".cache").mkdir()
    Image.new("RGB", (64, 64)).save(data / "imagenet" / ".cache" / "hidden.png")
    (data / "imagenet" / "n01440764" / "synsets.txt").write_text("not an image")
    make_images(data / "v", 1, size=(40, 40), seed=2)
    make_images(data / "t", 1, size=(40, 40), seed=3)
    found = [p.relative_to(data / "imagenet").as_posix()
             for p in list_images_tree(data / "imagenet")]
    assert found == ["n01440764/img00.png", "n01440764/img01.png",
                     "n01443537/deeper/img00.png", "top.jpg"]
    params = config.parse(tiny_params_dict(data={"train": ["imagenet"], "val": ["v"],
                                                 "test": ["t"]}))
    layout = Layout(tmp_path)
    check_data.run(params, layout)  # the guard stages see the tree too
    hash_data.run(params, layout)
    hashed = json.loads(layout.data_fingerprint("train").read_text())
    assert sorted(hashed["sets"][0]["files"]) == found
    counts = prepare(params, data, tmp_path / "prepared")
    assert counts["imagenet"] == 4
    train = open_train_set(tmp_path / "prepared" / "train", "imagenet", 4)
    assert [r.name for r in train.records] == found


def test_images_too_small_are_skipped_with_a_count_and_none_usable_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    make_images(data / "a", 3, size=(64, 64))
    make_images(data / "a" / "tiny", 2, size=(31, 200), seed=4)
    make_images(data / "v", 1, size=(40, 40), seed=2)
    make_images(data / "t", 1, size=(40, 40), seed=3)
    params = config.parse(tiny_params_dict(data={"train": ["a"], "val": ["v"], "test": ["t"]}))
    skipped: dict[str, int] = {}
    assert prepare(params, data, tmp_path / "prepared", skipped=skipped)["a"] == 3
    assert skipped == {"a": 2}
    assert "skipped 2 of 5 images smaller than prepare.min_hr_side = 32 px" in \
        capsys.readouterr().err
    params = config.parse(tiny_params_dict(data={"train": ["a"], "val": ["v"], "test": ["t"]},
                                           prepare={"min_hr_side": 65}))
    with pytest.raises(ImageError, match=r"no image .* 65 px \(prepare.min_hr_side\)"):
        prepare(params, data, tmp_path / "prepared")


def test_a_training_set_in_the_old_png_format_says_to_prepare_again(tmp_path: Path) -> None:
    hr = make_images(tmp_path / "raw", 1)[0]
    image = load_image(hr)
    folder = tmp_path / "prepared" / "train" / "old"
    for kind, img in (("HR", image), ("LR", bicubic_lr(image, 4))):
        (folder / kind).mkdir(parents=True)
        Image.fromarray(img).save(folder / kind / "img00.png")
    write_manifest(folder, {})
    with pytest.raises(ShardFormatError, match=r"PNG-pair format.*srgan prepare --split train"):
        open_train_set(tmp_path / "prepared" / "train", "old", 4)
    _write(tmp_path / "raw", tmp_path / "new")
    with pytest.raises(ImageError, match="prepared for scale 4, not 2"):
        ShardSet(tmp_path / "new", 2)


KILLER = """
import os, signal, sys
from pathlib import Path
import srcore.data.shards as sh

real, done = sh._commit_shard, []

def commit_then_die(*args):
    real(*args)
    done.append(args[1])
    if len(done) == 3:
        os.kill(os.getpid(), signal.SIGKILL)

sh._commit_shard = commit_then_die
src, out = Path(sys.argv[1]), Path(sys.argv[2])
sh.write_set(src, out, out.parent / "work", scale=4, sigma=None, min_hr_side=32,
             shard_mb=0.02, name="s", processes=2, progress=False)
"""


def test_a_prepare_killed_mid_way_resumes_without_redoing_finished_shards(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _textured(tmp_path / "src", [(64, 64)] * 3 + [(80, 64)] * 4)  # one image per shard
    # Killed with SIGKILL after its third shard, the pool (2 processes) degrading ahead.
    proc = subprocess.run([sys.executable, "-c", KILLER, str(tmp_path / "src"),
                           str(tmp_path / "killed" / "set")], cwd=REPO, timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    (work,) = (tmp_path / "killed" / "work").iterdir()
    finished = sorted(p.name for p in work.glob("shard-*.bin"))
    assert finished == ["shard-00000.bin", "shard-00001.bin", "shard-00002.bin"]
    kept = {name: (work / name).stat().st_ino for name in finished}
    (work / ".shard-00003.bin.tmp").write_bytes(b"half a shard")  # as a kill mid-write leaves
    # The rerun degrades only the images of the four unfinished shards...
    import srcore.data.shards as sh

    degraded: list[str] = []
    real = sh.degrade

    def counting(path: Path, scale: int, sigma: float | None):  # type: ignore[no-untyped-def]
        degraded.append(path.name)
        return real(path, scale, sigma)

    monkeypatch.setattr(sh, "degrade", counting)
    logged: list[str] = []
    stored, _, _ = _write(tmp_path / "src", tmp_path / "killed" / "set", log=logged.append)
    assert stored == 7 and degraded == ["im03.png", "im04.png", "im05.png", "im06.png"]
    assert "resuming; 3 of 7 shards were finished before" in logged[-1]
    # ... moves the finished shards in untouched, and leaves no work folder behind...
    out = tmp_path / "killed" / "set" / "shards"
    assert {n: (out / n).stat().st_ino for n in kept} == kept
    assert not (tmp_path / "killed" / "work").exists()
    # ... and the result is, byte for byte, an uninterrupted prepare's.
    monkeypatch.setattr(sh, "degrade", real)
    _write(tmp_path / "src", tmp_path / "whole" / "set", processes=2)
    for rel in ["index.json", *(f"shards/shard-{i:05d}.bin" for i in range(7))]:
        assert (tmp_path / "whole" / "set" / rel).read_bytes() == \
            (tmp_path / "killed" / "set" / rel).read_bytes(), rel
    # An attempt on other inputs or params is never resumed, and is cleared away.
    stale = tmp_path / "again" / "work" / "s-0123456789abcdef"
    stale.mkdir(parents=True)
    (stale / "shard-00000.bin").write_bytes(b"other inputs")
    (stale / "shard-00000.bin.json").write_text('{"records": [], "digests": {}}')
    logged.clear()
    _write(tmp_path / "src", tmp_path / "again" / "set", log=logged.append)
    assert not logged and not stale.parent.exists()
    assert (tmp_path / "again" / "set" / "index.json").read_bytes() == \
        (tmp_path / "whole" / "set" / "index.json").read_bytes()


def test_the_loader_keeps_no_image_in_memory(tmp_path: Path) -> None:
    _textured(tmp_path / "src", [(400, 300)] * 4)
    _write(tmp_path / "src", tmp_path / "set", shard_mb=64)
    shards = ShardSet(tmp_path / "set", 4)
    data = RandomCropBatches(shards, 4, 32, 4, 0, True)
    data[0]
    held = [v for v in vars(shards).values() if isinstance(v, np.ndarray)]
    held += [v for v in vars(data).values() if isinstance(v, np.ndarray)]
    assert sum(a.nbytes for a in held) < 1024  # the index table and the sampling weights
    # A shard cut short (a bad copy) is refused when opened, naming it.
    shard = shards.shard_files[0]
    with shard.open("r+b") as fh:
        fh.truncate(os.path.getsize(shard) - 1)
    with pytest.raises(ShardFormatError, match=r"shard-00000\.bin: truncated"):
        ShardSet(tmp_path / "set", 4)


def test_the_index_of_a_large_set_costs_bytes_per_image(tmp_path: Path) -> None:
    """100k images (ImageNet-like counts): the reader and the batches hold the index as
    arrays, well under 100 bytes per image beyond the names, and read only what they crop."""
    import tracemalloc

    n, side = 100_000, 128
    size = side * side * 3 + (side // 4) ** 2 * 3
    folder = tmp_path / "big"
    (folder / "shards").mkdir(parents=True)
    with (folder / "shards" / "shard-00000.bin").open("wb") as fh:
        fh.truncate(n * size)  # sparse: no disk used
    records = [[f"n{i % 1000:05d}/{i:07d}.JPEG", 0, i * size, side, side, 3] for i in range(n)]
    (folder / "index.json").write_text(json.dumps(
        {"format": "srgan-shards/1", "scale": 4, "shards": ["shards/shard-00000.bin"],
         "records": records}))
    del records
    tracemalloc.start()
    shards = ShardSet(folder, 4)
    data = RandomCropBatches(shards, 16, 96, 4, 0, True, "image")
    lr, hr = data[0]
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    names = sum(sys.getsizeof(name) for name in shards.names) + sys.getsizeof(shards.names)
    assert hr.shape == (16, 3, 96, 96)
    print(f"{(held - names) / n:.1f} bytes per image beside the names")
    assert (held - names) / n < 100, f"{(held - names) / n:.0f} bytes per image"
