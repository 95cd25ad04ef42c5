"""`srgan <stage>`: one line naming the problem and the fix, exit 2, earlier outputs intact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from srcore import cli
from tests.conftest import make_images, tiny_params_dict, write_params


def _project(tmp_path: Path, **sections: object) -> Path:
    params = tiny_params_dict(data={"train": ["a"], "val": ["v"], "test": ["b"]}, **sections)
    write_params(tmp_path / "params.yaml", params)
    make_images(tmp_path / "data" / "a", 3, size=(64, 64))
    make_images(tmp_path / "data" / "v", 1, size=(48, 48), seed=2)
    make_images(tmp_path / "data" / "b", 1, size=(48, 48), seed=1)
    return tmp_path


def _main(root: Path, *args: str) -> int:
    return cli.main(["--params", str(root / "params.yaml"), "--root", str(root), *args])


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"pretrain": {"lr": -1.0}}, "pretrain.lr"),
        ({"scale": 5}, "'scale'"),
        ({"scale": 3}, "'scale'"),  # SRResNet's x2 sub-pixel blocks cannot make x3
    ],
)
def test_bad_params_stop_before_any_work(tmp_path: Path, capsys, edit, needle) -> None:
    root = _project(tmp_path, **edit)
    assert _main(root, "prepare") == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not (root / "prepared").exists()


def test_missing_key_names_it(tmp_path: Path, capsys) -> None:
    root = _project(tmp_path)
    text = (root / "params.yaml").read_text().replace("  retries: 3\n", "")
    (root / "params.yaml").write_text(text)
    assert _main(root, "check-data") == 2
    assert "key 'download.retries' is missing" in capsys.readouterr().err


def test_corrupt_image_names_file_and_keeps_prepared(tmp_path: Path, capsys) -> None:
    root = _project(tmp_path)
    assert _main(root, "prepare") == 0
    stamp = {p: p.stat().st_mtime_ns for p in (root / "prepared").rglob("*.png")}
    (root / "data" / "a" / "img02.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert _main(root, "prepare") == 2
    err = capsys.readouterr().err
    assert "img02.png" in err and "Traceback" not in err
    assert {p: p.stat().st_mtime_ns for p in (root / "prepared").rglob("*.png")} == stamp


def test_check_data_and_finetune_without_pretrain_say_what_to_run(tmp_path: Path,
                                                                   capsys) -> None:
    root = _project(tmp_path)
    (root / "data" / "b" / "img00.png").unlink()
    assert _main(root, "check-data") == 2
    assert "run `srgan download`" in capsys.readouterr().err
    assert _main(root, "finetune") == 2
    assert "run `srgan pretrain` first" in capsys.readouterr().err


def test_missing_vgg_weights_explain_where_and_the_mse_alternative(
        tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    root = _project(tmp_path, finetune={"content_loss": "vgg54"})
    (root / "models").mkdir()
    (root / "models" / "srresnet.pt").write_bytes(b"placeholder, never read")
    assert _main(root, "finetune") == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in err
    assert "content_loss: mse" in err


def test_every_stage_has_help() -> None:
    out = subprocess.run([sys.executable, "-m", "srcore.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for stage in ("download", "prepare", "pretrain", "finetune", "evaluate"):
        assert stage in out
        sub = subprocess.run([sys.executable, "-m", "srcore.cli", stage, "--help"],
                             capture_output=True, text=True, check=True).stdout
        assert "params.yaml" in sub and cli.HELP[stage].split()[0] in sub, stage
