"""`srgan <stage>`: one line naming the problem and the fix, exit 2, earlier outputs intact;
everything params.yaml can tell is checked before any work; one run per workspace at a time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from srcore import cli
from tests.conftest import make_images, tiny_params_dict, write_params

# Every stage logs to the test's own store (a copy of a ready-made one), never the project's.
pytestmark = pytest.mark.usefixtures("mlflow_store")


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


# ------------------------------------------------------------------- checked before any work


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("data", "needle"), [
    ({"train": [{"name": "mine", "url": "incoming"}], "test": ["nosuchset"]},
     "dataset 'nosuchset' in data.test is not in the dataset registry"),
    ({"train": [{"name": "mine", "url": "not/there"}], "test": ["sample_test"]},
     "dataset 'mine' in data.train: {root}/not/there does not exist"),
])
def test_download_checks_every_dataset_before_fetching_any(
        tmp_path: Path, capsys, data: dict[str, object], needle: str) -> None:
    """The issue's `data.test: [nosuchset]`: refused at once, not after the training sets
    were fetched; a relative local source is read from the project root, not the cwd."""
    make_images(tmp_path / "incoming", 2)
    write_params(tmp_path / "exp.yaml", tiny_params_dict(data={"val": ["sample_val"], **data}))
    assert cli.main(["--params", str(tmp_path / "exp.yaml"), "--root", str(tmp_path),
                     "download", "--no-dvc"]) == 2
    err = _error(capsys)
    assert err.startswith(f"srgan download: error: {tmp_path / 'exp.yaml'}: ")
    assert needle.format(root=tmp_path) in err
    assert not (tmp_path / "data").exists()


def test_training_checks_name_the_params_file_given(tmp_path: Path, capsys,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    root = _project(tmp_path)
    other = root / "exp.yaml"
    # prepared/ made at scale 4, params now at 2: refused before any training
    assert _main(root, "prepare") == 0
    capsys.readouterr()
    write_params(other, tiny_params_dict(data={"train": ["a"], "val": ["v"], "test": ["b"]},
                                         scale=2))
    args = ["--params", str(other), "--root", str(root)]
    assert cli.main([*args, "pretrain"]) == 2
    err = _error(capsys)
    assert f"{other}: key 'scale' is 2, but prepared set 'a' was made at scale 4" in err
    assert "run `srgan prepare`" in err and not (root / "models").exists()
    # torchrun's world against runtime.distributed, before the process group is joined
    write_params(other, tiny_params_dict(data={"train": ["a"], "val": ["v"], "test": ["b"]}))
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    assert cli.main([*args, "pretrain"]) == 2
    assert f"{other}: this is one of 3 processes started by torchrun" in _error(capsys)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    # the gate set (item 9): the file named is the one given, not always params.yaml
    raw = tiny_params_dict(data={"train": ["a"], "val": ["v"], "test": ["b"]})
    raw["tracking"]["gate_set"] = "b"
    write_params(other, raw)
    assert cli.main([*args, "evaluate"]) == 2
    err = _error(capsys)
    assert f"{other}: key 'tracking' is invalid: gate_set 'b' is not one of the validation" in err


def test_batch_sizes_are_checked_against_torchruns_world(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from srcore import config, preflight

    raw = tiny_params_dict(runtime={"distributed": True})
    raw["finetune"]["batch_size"] = 3
    params = config.parse(raw)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    preflight.check(params, "p.yaml", tmp_path, ["pretrain"])  # 2 splits over 2 processes
    with pytest.raises(preflight.PreflightError,
                       match=r"p\.yaml: key 'finetune\.batch_size' is 3, which does not split "
                             r"evenly over 2 processes"):
        preflight.check(params, "p.yaml", tmp_path, ["finetune"])


def test_vgg_weights_are_checked_when_the_run_reaches_finetune(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from srcore import config, preflight
    from srcore.models import vgg

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(vgg.URL_ENV, "")  # fetching off, nothing cached
    params = config.parse(tiny_params_dict(finetune={"content_loss": "vgg54"}))
    preflight.check(params, "p.yaml", tmp_path, ["pretrain"])  # does not reach finetune
    with pytest.raises(preflight.PreflightError, match="finetune.content_loss is vgg54, but the "
                       "VGG19 ImageNet weights are not at .*content_loss: mse in p.yaml"):
        preflight.check(params, "p.yaml", tmp_path, ["download", "prepare", "finetune"])
    monkeypatch.setenv(vgg.URL_ENV, "http://127.0.0.1:9/vgg19-dcbb9e9d.pth")  # fetchable
    preflight.check(params, "p.yaml", tmp_path, ["finetune"])
    cached = vgg.weights_path()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"cached")
    monkeypatch.setenv(vgg.URL_ENV, "")
    preflight.check(params, "p.yaml", tmp_path, ["finetune"])


# --------------------------------------------------------------------- one run per workspace


def _hold_lock(root: Path) -> subprocess.Popen[str]:
    """Another process holding root's workspace lock (as a scheduled run would)."""
    proc = subprocess.Popen(
        [sys.executable, "-c",
         "import time; from filelock import FileLock; "
         f"lock = FileLock({str(root / '.srgan.lock')!r}); lock.acquire(); "
         "print('held', flush=True); "
         "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_stage_by_hand_never_interleaves_with_another_run(tmp_path: Path, capsys) -> None:
    import time

    root = _project(tmp_path)
    before = (root / "params.yaml").read_text()
    (root / "overlay.yaml").write_text("pretrain: {iterations: 7}\n")
    holder = _hold_lock(root)
    try:
        assert _main(root, "check-data") == 2
        err = _error(capsys)
        assert f"another srgan run is using {root} (lock {root / '.srgan.lock'}" in err
        assert "pass --lock-timeout SECONDS to wait" in err
        started = time.perf_counter()
        assert _main(root, "--lock-timeout", "0.5", "check-data") == 2
        capsys.readouterr()
        assert 0.4 < time.perf_counter() - started < 5  # it waited, then stopped
        assert _main(root, "params", "apply", str(root / "overlay.yaml")) == 2
        assert "another srgan run" in _error(capsys)
        assert (root / "params.yaml").read_text() == before
        assert not (root / ".srgan" / "data-check.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert _main(root, "check-data") == 0  # free again


def test_stages_the_lock_holder_starts_do_not_wait_for_it(tmp_path: Path) -> None:
    """The flow holds the lock while DVC runs `srgan <stage>` as its subprocess: the child
    inherits the holder's token and goes ahead; any other process still waits."""
    import os

    from srcore.workspace import TOKEN_ENV, workspace_lock

    root = _project(tmp_path)
    cmd = [sys.executable, "-m", "srcore.cli", "--params", str(root / "params.yaml"),
           "--root", str(root), "check-data"]
    with workspace_lock(root, 0, "wait"):
        child = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert child.returncode == 0, child.stderr
        stranger = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                                  env={**os.environ, TOKEN_ENV: "not-the-holders"})
        assert stranger.returncode == 2 and "another srgan run" in stranger.stderr
    assert TOKEN_ENV not in os.environ


def test_a_stage_logs_to_the_store_of_its_root_not_the_cwd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`srgan --root X` run from elsewhere (a test from the repo, a cron job from $HOME) used
    to put mlflow.db and mlruns/ in the working directory."""
    (tmp_path / "proj").mkdir()
    root = _project(tmp_path / "proj")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert _main(root, "prepare") == 0
    assert (root / "mlflow.db").is_file()
    assert list(elsewhere.iterdir()) == []
