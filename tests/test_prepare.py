"""The prepare stage: modcrop + MATLAB-bicubic LR into prepared/<split>/<set>, a manifest per
set that every reader checks, shared images refused, and prepared/ swapped in atomically."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from srcore import config, layout
from srcore.cli import main
from srcore.data.datasets import load_pairs, open_train_set, verify_prepared
from srcore.data.degrade import bicubic_lr
from srcore.data.images import ImageError
from srcore.data.manifest import ManifestError, SharedImageError
from srcore.data.shards import ShardSet
from srcore.stages.check_data import MissingDataError
from srcore.stages.prepare import prepare
from tests.conftest import make_images, make_prepared_sets, tiny_params_dict, write_params

SETS = {"train": ["a"], "val": ["v"], "test": ["b"]}


def _params(**data: object) -> config.Params:
    return config.parse(tiny_params_dict(data={**SETS, **data}))


def _data(root: Path) -> Path:
    data = root / "data"
    make_images(data / "a", 2, size=(66, 51), grey=1)
    make_images(data / "v", 1, size=(40, 40), seed=2)
    make_images(data / "b", 1, size=(40, 40), seed=1)
    return data


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_pairs_are_cropped_bicubic_and_listed_in_a_manifest(tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    data = _data(tmp_path)
    make_images(data / "v", 1, size=(51, 66), seed=3)  # val/test: PNG pairs, as before
    counts = prepare(_params(), data, out)
    assert counts == {"a": 2, "v": 1, "b": 1}
    assert sorted(p.name for p in out.iterdir()) == ["test", "train", "val"]
    hr = np.asarray(Image.open(out / "val" / "v" / "HR" / "img00.png"))
    lr = np.asarray(Image.open(out / "val" / "v" / "LR" / "img00.png"))
    assert hr.shape == (64, 48, 3) and lr.shape == (16, 12, 3)  # 51x66 cropped to x4
    np.testing.assert_array_equal(lr, bicubic_lr(hr, 4))
    # Training sets are shards + index: the same crop and LR, grey kept as one channel.
    train = ShardSet(out / "train" / "a", 4)
    assert [r.name for r in train.records] == ["img00.png", "img01.png"]
    hr, lr = train.image(1)
    assert hr.shape == (48, 64, 3) and lr.shape == (12, 16, 3)  # 66x51 cropped to x4
    np.testing.assert_array_equal(lr, bicubic_lr(hr, 4))
    grey, _ = train.image(0)
    assert grey.shape == (48, 64, 1)  # grey stays grey (expanded to RGB per crop)
    manifest = json.loads((out / "train" / "a" / "manifest.json").read_text())
    assert manifest["set"] == "a" and manifest["split"] == "train" and manifest["scale"] == 4
    assert sorted(manifest["files"]) == ["index.json", "shards/shard-00000.bin"]
    manifest = json.loads((out / "val" / "v" / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["HR/img00.png", "LR/img00.png"]
    # Folders get a plain mkdir's permissions, not mkdtemp's 0700.
    umask = os.umask(0)
    os.umask(umask)
    for folder in (out, out / "train", out / "val" / "v" / "HR", out / "train" / "a" / "shards"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    # The same inputs give the same bytes (DVC and git see no change).
    before = _tree(out)
    prepare(_params(), tmp_path / "data", out)
    assert _tree(out) == before
    assert not (out / ".work").exists()


def test_one_split_is_rebuilt_alone(tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    data = _data(tmp_path)
    prepare(_params(), data, out)
    train = _tree(out / "train")
    make_images(data / "c", 1, size=(40, 40), seed=5)
    counts = prepare(_params(test=["b", "c"]), data, out, ["test"])
    assert counts == {"b": 1, "c": 1}
    assert sorted(p.name for p in (out / "test").iterdir()) == ["b", "c"]
    assert _tree(out / "train") == train
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_corrupt_image_names_the_file_and_keeps_old_output(tmp_path: Path) -> None:
    data = _data(tmp_path)
    out = tmp_path / "prepared"
    prepare(_params(), data, out)
    before = _tree(out)
    bad = data / "a" / "img01.png"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated PNG
    with pytest.raises(ImageError, match="img01.png"):
        prepare(_params(), data, out)
    assert _tree(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]


def test_two_sets_sharing_an_image_are_refused(tmp_path: Path) -> None:
    data = _data(tmp_path)
    # The same photo, re-encoded as RGB where it was grey: same pixels, other bytes.
    Image.open(data / "a" / "img00.png").convert("RGB").save(data / "b" / "copy.png")
    with pytest.raises(SharedImageError) as err:
        prepare(_params(), data, tmp_path / "prepared")
    message = str(err.value)
    assert "'a' and 'b'" in message
    assert str(data / "a" / "img00.png") in message and str(data / "b" / "copy.png") in message
    assert not (tmp_path / "prepared").exists()


def test_missing_dataset_says_to_download(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match="srgan download"):
        prepare(_params(), tmp_path / "data", tmp_path / "prepared")


def test_swap_leaves_the_old_or_the_new_folder(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "prepared"
    (target / "x").mkdir(parents=True)
    (target / "x" / "old").write_text("old")

    def fresh(text: str) -> Path:
        new = layout.new_folder_beside(target)
        (new / "x").mkdir()
        (new / "x" / text).write_text(text)
        return new

    layout.swap_in(fresh("new1"), target)  # one renameat2(RENAME_EXCHANGE) on Linux
    assert [p.name for p in (target / "x").iterdir()] == ["new1"]
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]

    # Without an exchange: rename aside, rename in. A kill between the two renames...
    monkeypatch.setattr(layout, "_exchange", lambda a, b: False)
    real_replace, calls = os.replace, []

    def killed_on_second(src: object, dst: object) -> None:
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(layout.os, "replace", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        layout.swap_in(fresh("new2"), target)
    monkeypatch.setattr(layout.os, "replace", real_replace)
    assert not target.exists()
    # ... is undone by the next run before it does anything.
    layout.clear_leftovers(target)
    assert [p.name for p in (target / "x").iterdir()] == ["new1"]
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]
    layout.swap_in(fresh("new3"), target)
    assert [p.name for p in (target / "x").iterdir()] == ["new3"]


def test_readers_refuse_a_removed_altered_or_added_file(tmp_path: Path) -> None:
    prepared = make_prepared_sets(tmp_path)
    data = config.parse(tiny_params_dict(data={"train": ["tr"], "val": ["va"],
                                               "test": ["te"]})).data
    verify_prepared(prepared, data, ("train", "val", "test"))
    assert len(open_train_set(prepared / "train", "tr", 4)) == 3
    assert len(load_pairs(prepared, "va", 4)) == 1  # found in its split folder
    hr = prepared / "val" / "va" / "HR" / "img00.png"
    saved = hr.read_bytes()
    hr.unlink()
    for call in (lambda: verify_prepared(prepared, data, ("val",)),
                 lambda: load_pairs(prepared / "val", "va", 4)):
        with pytest.raises(ManifestError, match=r"img00\.png: missing.*dvc checkout.*srgan prep"):
            call()
    hr.write_bytes(saved[:-1] + b"\0")
    with pytest.raises(ManifestError, match=r"img00\.png: altered"):
        verify_prepared(prepared, data, ("val",))
    hr.write_bytes(saved)
    shutil.copyfile(hr, hr.with_name("extra.png"))
    with pytest.raises(ManifestError, match=r"extra\.png: not in"):
        verify_prepared(prepared, data, ("val",))
    # A training shard is checked the same way, before any crop is read from it.
    shard = prepared / "train" / "tr" / "shards" / "shard-00001.bin"
    saved = shard.read_bytes()
    shard.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
    for call in (lambda: verify_prepared(prepared, data, ("train",)),
                 lambda: open_train_set(prepared / "train", "tr", 4)):
        with pytest.raises(ManifestError, match=r"shard-00001\.bin: altered"):
            call()
    shard.unlink()
    with pytest.raises(ManifestError, match=r"shard-00001\.bin: missing"):
        open_train_set(prepared / "train", "tr", 4)


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "evaluate"])
def test_stages_stop_on_a_missing_file_before_any_work(
        tmp_path: Path, stage: str, mlflow_store: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    make_prepared_sets(tmp_path)
    write_params(tmp_path / "params.yaml", tiny_params_dict(
        data={"train": ["tr"], "val": ["va"], "test": ["te"]}))
    (tmp_path / "models").mkdir()
    for name in ("srresnet", "srgan"):
        (tmp_path / "models" / f"{name}.pt").write_bytes(b"not read: the check comes first")
    gone = (tmp_path / "prepared" / "test" / "te" / "LR" / "img00.png" if stage == "evaluate"
            else tmp_path / "prepared" / "train" / "tr" / "shards" / "shard-00000.bin")
    gone.unlink()
    store = Path(mlflow_store.removeprefix("sqlite:///"))
    before = store.read_bytes()
    code = main(["--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path), stage])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and f"{gone}: missing from prepared/" in err
    assert "dvc checkout" in err and "srgan prepare" in err
    assert not (tmp_path / "metrics").exists()
    assert store.read_bytes() == before  # no MLflow run was opened


# ------------------------------------------------------------------------ hash-data (DVC guard)


def test_hash_data_writes_one_fingerprint_per_split(tmp_path: Path) -> None:
    from srcore.layout import Layout
    from srcore.stages import hash_data

    _data(tmp_path)
    root = Layout(tmp_path)
    hash_data.run(_params(), root)
    first = {s: root.data_fingerprint(s).read_bytes() for s in ("train", "val", "test")}
    train = json.loads(first["train"])
    assert train["split"] == "train" and [s["name"] for s in train["sets"]] == ["a"]
    assert sorted(train["sets"][0]["files"]) == ["img00.png", "img01.png"]
    # A new test set changes only the test split's file: prepare@train and @val stay.
    make_images(tmp_path / "data" / "c", 1, size=(40, 40), seed=7)
    hash_data.run(_params(test=["b", "c"]), root)
    after = {s: root.data_fingerprint(s).read_bytes() for s in ("train", "val", "test")}
    assert after["train"] == first["train"] and after["val"] == first["val"]
    assert after["test"] != first["test"]


def test_hash_data_refuses_an_image_in_two_sets(tmp_path: Path) -> None:
    from srcore.layout import Layout
    from srcore.stages import hash_data

    data = _data(tmp_path)
    shutil.copyfile(data / "v" / "img00.png", data / "b" / "same.png")
    with pytest.raises(SharedImageError, match=r"sets 'v' and 'b' share an image") as err:
        hash_data.run(_params(), Layout(tmp_path))
    assert str(data / "v" / "img00.png") in str(err.value)
    assert str(data / "b" / "same.png") in str(err.value)
    assert not Layout(tmp_path).data_fingerprint("test").exists()
