"""Training: survives SIGKILL with identical results, follows the paper's recipe, logs to
MLflow, refuses foreign weights with a message naming the key, and holds memory flat."""

from __future__ import annotations

import ast
import copy
import gc
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
from torch import nn

from srcore import config
from srcore.layout import Layout
from srcore.losses import ContentLoss
from srcore.models.discriminator import Discriminator
from srcore.models.srresnet import SRResNet, build_generator
from srcore.stages import finetune, pretrain
from srcore.training import checkpoints, loop, runtime, steps
from srcore.training.checkpoints import CheckpointMismatch, UnreadableWeights
from tests.conftest import make_prepared_sets, tiny_params_dict, write_params

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared_sets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepared/{tr,te}/{HR,LR}: smooth random images and their MATLAB-bicubic x4 LR."""
    return make_prepared_sets(tmp_path_factory.mktemp("prepared-src"))


def _params(**sections: Any) -> dict[str, Any]:
    raw = tiny_params_dict(data={"train": ["tr"], "val": ["va"], "test": ["te"]})
    raw["tracking"]["register_models"] = False
    for key, value in sections.items():
        raw[key].update(value)
    return raw


def _project(root: Path, prepared: Path, raw: dict[str, Any]) -> tuple[config.Params, Layout]:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(prepared, root / "prepared", dirs_exist_ok=True)
    write_params(root / "params.yaml", raw)
    return config.load(root / "params.yaml"), Layout(root)


class FakeTracker:
    """Records what the loop logs; an optional hook sees every log_metrics call."""

    def __init__(self, on_log: Callable[[int | None], None] | None = None) -> None:
        self.run_id = "fake-run"
        self.metrics: dict[str, dict[int | None, float]] = {}
        self.images: list[str] = []
        self.on_log = on_log

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            self.metrics.setdefault(k, {})[step] = float(v)
        if self.on_log is not None:
            self.on_log(step)

    def log_image(self, image: np.ndarray, name: str) -> None:
        self.images.append(name)


def _save_srresnet(layout: Layout, raw: dict[str, Any], seed: int = 1, **spec: Any) -> None:
    torch.manual_seed(seed)
    model = dict(raw["model"], **spec)
    g = SRResNet(model["blocks"], model["channels"], raw["scale"], model["global_skip"])
    checkpoints.save_generator(g, layout.model("srresnet"), {})


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, name: str, calls: int) -> None:
    """Make the stage's step raise (like a kill) on call `calls + 1`."""
    real = getattr(steps, name)

    def factory(*args: Any, **kwargs: Any) -> steps.StepFn:
        step, count = real(*args, **kwargs), [0]

        def wrapped(lr: torch.Tensor, hr: torch.Tensor) -> dict[str, float]:
            count[0] += 1
            if count[0] > calls:
                raise KeyboardInterrupt
            return step(lr, hr)

        return wrapped

    monkeypatch.setattr(steps, name, factory)


def _assert_same_weights(a: nn.Module | dict, b: nn.Module | dict) -> None:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------ kill -9 and resume


def _cli(root: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "srcore.cli", "--params", str(root / "params.yaml"),
             "--root", str(root), "pretrain"],
            cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT)


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SRGAN_PARENT_RUN_ID"}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    return env


def _wait_for(cond: Callable[[], bool], proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + 90
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"pretrain exited ({proc.returncode}) before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_result(
        tmp_path: Path, prepared_sets: Path, mlflow_template: Path) -> None:
    every = 10
    raw = _params(pretrain={"iterations": 120, "checkpoint_every": every, "log_every": 1,
                            "val_every": 60})
    raw["runtime"]["deterministic"] = True
    root, log = tmp_path / "killed", tmp_path / "killed.log"
    _project(root, prepared_sets, raw)
    shutil.copyfile(mlflow_template, root / "mlflow.db")
    ckpt = root / "checkpoints" / "pretrain.pt"
    proc = _cli(root, _env(root), log)
    _wait_for(ckpt.exists, proc, log, "the first checkpoint")
    first = ckpt.stat().st_mtime_ns
    t0 = time.monotonic()
    _wait_for(lambda: ckpt.stat().st_mtime_ns != first, proc, log, "the second checkpoint")
    interval = time.monotonic() - t0  # <= one checkpoint interval; 10 intervals remain
    seed = random.SystemRandom().randrange(2**32)
    delay = random.Random(seed).uniform(0, 3 * interval)
    time.sleep(delay)
    assert proc.poll() is None, f"finished before the kill (delay {delay:.3f} s, seed {seed})"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    saved = torch.load(ckpt, weights_only=True)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    killed_at = max(m.step for m in client.get_metric_history(saved["run_id"],
                                                              "pretrain/loss_mse"))

    rerun = subprocess.run(
        [sys.executable, "-m", "srcore.cli", "--params", str(root / "params.yaml"),
         "--root", str(root), "pretrain"],
        cwd=root, env=_env(root), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    found = re.search(r"pretrain: resuming from \S+ at iteration (\d+)", rerun.stderr)
    assert found, rerun.stderr
    resumed = int(found.group(1))
    note = f"killed after iteration {killed_at}, resumed at {resumed} (seed {seed})"
    assert resumed == saved["iteration"], note
    assert killed_at - every <= resumed <= killed_at, note
    assert re.search(r"\d+(\.\d+)?it/s", rerun.stderr)  # the progress bar's rate
    assert not ckpt.exists()

    # the same seed and params, never interrupted (in this process: same kernels, 1 thread)
    params, straight = _project(tmp_path / "straight", prepared_sets, raw)
    want, _ = pretrain.train(params, straight, FakeTracker())
    got = torch.load(root / "models" / "srresnet.pt", weights_only=True)["state_dict"]
    _assert_same_weights(want, got)

    runs = client.search_runs(client.get_experiment_by_name("srgan-pipeline").experiment_id)
    assert [r.info.run_id for r in runs] == [saved["run_id"]], note  # one run, resumed
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["pretrain/resumed_at"] == resumed
    steps = {m.step for m in client.get_metric_history(saved["run_id"], "pretrain/loss_mse")}
    assert steps == set(range(1, 121))


def test_interrupted_finetune_with_ema_resumes_exactly(
        tmp_path: Path, prepared_sets: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """D, both optimisers, the lr drop at the midpoint, EMA and log averages all resume."""
    raw = _params(finetune={"iterations": 10, "checkpoint_every": 4, "log_every": 3,
                            "val_every": 10, "lr": 1e-3, "lr_second_half": 1e-4})
    raw["finetune"]["ema_decay"] = 0.9
    params, straight = _project(tmp_path / "a", prepared_sets, raw)
    _, resumed = _project(tmp_path / "b", prepared_sets, raw)
    for layout in (straight, resumed):
        _save_srresnet(layout, raw)
    want_tracker = FakeTracker()
    want, _ = finetune.train(params, straight, want_tracker)

    with monkeypatch.context() as m:
        _interrupt_after(m, "make_finetune_step", 6)  # last checkpoint: 4, lr drops after 5
        with pytest.raises(KeyboardInterrupt):
            finetune.train(params, resumed, FakeTracker())
    tracker = FakeTracker()
    got, _ = finetune.train(params, resumed, tracker)
    assert "finetune: resuming from" in capsys.readouterr().err
    assert tracker.metrics["finetune/resumed_at"] == {4: 4.0}
    _assert_same_weights(want, got)
    for key, history in tracker.metrics.items():
        if key != "finetune/resumed_at":
            assert history == {s: want_tracker.metrics[key][s] for s in history}, key
    assert tracker.metrics["finetune/lr"][10] == pytest.approx(1e-4)
    # what is saved is the EMA, not the raw weights
    ckpt = torch.load(resumed.checkpoints / "finetune.pt", weights_only=True)
    assert ckpt["iteration"] == 8
    assert not torch.equal(ckpt["model.generator"]["tail.weight"],
                           ckpt["ema"]["module.tail.weight"])


def test_cosine_pretrain_anneals_to_zero_and_resumes_on_the_curve(
        tmp_path: Path, prepared_sets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _params(pretrain={"iterations": 10, "checkpoint_every": 4, "log_every": 1,
                            "val_every": 10, "lr": 1e-3, "lr_schedule": "cosine"})
    params, straight = _project(tmp_path / "a", prepared_sets, raw)
    _, resumed = _project(tmp_path / "b", prepared_sets, raw)
    want_tracker = FakeTracker()
    want, _ = pretrain.train(params, straight, want_tracker)
    lrs = want_tracker.metrics["pretrain/lr"]
    # iteration i runs at lr * (1 + cos(pi * (i - 1) / N)) / 2: lr first, near 0 last
    assert lrs == pytest.approx({i: 1e-3 * (1 + math.cos(math.pi * (i - 1) / 10)) / 2
                                 for i in range(1, 11)})

    with monkeypatch.context() as m:
        _interrupt_after(m, "make_pretrain_step", 6)  # last checkpoint at 4
        with pytest.raises(KeyboardInterrupt):
            pretrain.train(params, resumed, FakeTracker())
    tracker = FakeTracker()
    got, _ = pretrain.train(params, resumed, tracker)
    assert tracker.metrics["pretrain/resumed_at"] == {4: 4.0}
    assert tracker.metrics["pretrain/lr"] == {i: lrs[i] for i in range(5, 11)}
    _assert_same_weights(want, got)


# --------------------------------------------------------------------- refusing weights


def test_load_state_checked_names_the_key() -> None:
    small, wide = SRResNet(1, 8), SRResNet(1, 16)
    with pytest.raises(CheckpointMismatch, match=r"'head\.0\.weight' has shape"):
        checkpoints.load_state_checked(wide, small.state_dict(), "ckpt.pt")
    deep = SRResNet(2, 8).state_dict()
    with pytest.raises(CheckpointMismatch, match=r"unexpected key 'body\.1\."):
        checkpoints.load_state_checked(small, deep, "ckpt.pt")
    with pytest.raises(CheckpointMismatch, match=r"'body\.1\.body\.0\.weight' is missing"):
        checkpoints.load_state_checked(SRResNet(2, 8), small.state_dict(), "ckpt.pt")
    checkpoints.load_state_checked(SRResNet(1, 8), small.state_dict(), "ckpt.pt")


def test_finetune_refuses_an_srresnet_of_another_shape(tmp_path: Path,
                                                       prepared_sets: Path) -> None:
    raw = _params()
    raw["model"]["channels"] = 16
    params, layout = _project(tmp_path, prepared_sets, raw)
    _save_srresnet(layout, raw, channels=8)
    with pytest.raises(CheckpointMismatch, match=r"srresnet\.pt: key 'head\.0\.weight'"):
        finetune.train(params, layout, FakeTracker())
    _save_srresnet(layout, raw, global_skip=not raw["model"]["global_skip"])
    with pytest.raises(CheckpointMismatch, match="'global_skip'"):
        finetune.train(params, layout, FakeTracker())


def test_resume_refuses_a_checkpoint_of_another_shape(
        tmp_path: Path, prepared_sets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _params(pretrain={"iterations": 6, "checkpoint_every": 2})
    params, layout = _project(tmp_path, prepared_sets, raw)
    with monkeypatch.context() as m:
        _interrupt_after(m, "make_pretrain_step", 3)
        with pytest.raises(KeyboardInterrupt):
            pretrain.train(params, layout, FakeTracker())
    raw["model"]["channels"] = 16
    params16, _ = _project(tmp_path, prepared_sets, raw)
    path = layout.checkpoints / "pretrain.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["fingerprint"] = checkpoints.fingerprint(params16, "pretrain", layout.prepared)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointMismatch, match=r"'head\.0\.weight'.*delete .*pretrain"):
        pretrain.train(params16, layout, FakeTracker())


def test_checkpoints_of_other_params_or_another_srresnet_are_not_resumed(
        tmp_path: Path, capsys) -> None:
    params = config.parse(_params())
    path = tmp_path / "finetune.pt"
    prepared = tmp_path / "prepared"
    fp = checkpoints.fingerprint(params, "finetune", prepared)
    checkpoints.atomic_save({"fingerprint": fp, "iteration": 2, "init_digest": "aaa"}, path)
    assert checkpoints.read_checkpoint(path, fp, "aaa")["iteration"] == 2
    assert checkpoints.read_checkpoint(path, fp) is not None  # the CLI's call
    assert checkpoints.read_checkpoint(path, fp, "bbb") is None
    assert "another models/srresnet.pt" in capsys.readouterr().err
    other = config.parse(_params(finetune={"lr": 5e-5}))
    assert checkpoints.read_checkpoint(
        path, checkpoints.fingerprint(other, "finetune", prepared)) is None
    assert checkpoints.fingerprint(other, "pretrain", prepared) == checkpoints.fingerprint(
        params, "pretrain", prepared)
    data = {"train": ["tr"], "val": ["va"], "test": ["te"]}
    # Keys that change no result (srcore.stages.NO_RESULT) never discard a checkpoint.
    cadence = config.parse(tiny_params_dict(data=data, runtime={"num_workers": 3},
                                            finetune={"log_every": 1, "checkpoint_every": 3}))
    assert checkpoints.fingerprint(cadence, "finetune", prepared) == fp
    path.write_bytes(b"torn")
    assert checkpoints.read_checkpoint(path, fp) is None
    assert not list(tmp_path.glob(".*.tmp"))


def test_weights_are_loaded_with_weights_only_everywhere(tmp_path: Path, capsys) -> None:
    loads = []
    for source in sorted((REPO / "srcore").rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"):
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and \
                    kw["weights_only"].value is True
                loads.append((f"{source.name}:{node.lineno}", ok))
    assert len(loads) >= 3 and all(ok for _, ok in loads), loads

    unsafe = {"spec": {"blocks": 1}, "hook": nn.ReLU()}  # a pickled object, not just tensors
    torch.save(unsafe, tmp_path / "evil.pt")
    with pytest.raises(UnreadableWeights, match="evil.pt"):
        checkpoints.load_generator_file(tmp_path / "evil.pt")
    assert checkpoints.read_checkpoint(tmp_path / "evil.pt", "x") is None
    err = capsys.readouterr().err
    assert "objects other than tensors" in err and "weights_only" not in err


# ---------------------------------------------------------------------- the paper's recipe


def _steps(adv_weight: float, d_steps: int = 1) -> dict[str, Any]:
    params = config.parse(_params(finetune={"adv_weight": adv_weight, "d_steps": d_steps,
                                            "lr": 1e-3}))
    cfg, cpu = params.finetune, torch.device("cpu")
    torch.manual_seed(0)
    g_ft = SRResNet(1, 8, 4, True)
    g_pt = copy.deepcopy(g_ft)
    d = Discriminator(32, 8)
    opt_g = runtime.make_adam(g_ft, cfg.lr, (cfg.beta1, cfg.beta2), cpu)
    opt_d = runtime.make_adam(d, cfg.lr, (cfg.beta1, cfg.beta2), cpu)
    d_grads: list[list[torch.Tensor]] = []
    d_step = opt_d.step

    def counting_step(*a: Any, **k: Any) -> Any:
        d_grads.append([p.grad.clone() for p in d.parameters()])
        return d_step(*a, **k)

    opt_d.step = counting_step  # type: ignore[method-assign]
    ft = steps.make_finetune_step(g_ft, d, ContentLoss("mse"), opt_g, opt_d, cfg, params, cpu)
    pt = steps.make_pretrain_step(
        g_pt, runtime.make_adam(g_pt, cfg.lr, (cfg.beta1, cfg.beta2), cpu), params, cpu)
    lr, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 32, 32) * 2 - 1
    out = ft(lr, hr)
    pt(lr, hr)
    return {"g_ft": g_ft, "g_pt": g_pt, "d": d, "out": out, "d_grads": d_grads}


def test_finetune_step_is_content_plus_weighted_adversarial_with_k_d_steps() -> None:
    zero = _steps(adv_weight=0.0, d_steps=3)
    # without the adversarial term G takes exactly a pixel-MSE step (and runs forward once:
    # a second training-mode forward would move BN statistics twice)
    _assert_same_weights(zero["g_ft"], zero["g_pt"])
    assert len(zero["d_grads"]) == 3  # k D updates per G update
    weighted = _steps(adv_weight=0.5)
    last = weighted["d_grads"][-1]
    for p, g in zip(weighted["d"].parameters(), last, strict=True):
        assert p.requires_grad and torch.equal(p.grad, g)  # G's update left D's grads alone
    out = weighted["out"]
    assert out["loss_g"] == pytest.approx(out["loss_g_content"] + 0.5 * out["loss_g_adv"])
    assert not torch.equal(weighted["g_ft"].tail.weight, weighted["g_pt"].tail.weight)
    assert set(out) == {"loss_g", "loss_g_content", "loss_g_adv", "loss_d_real",
                        "loss_d_fake", "d_real_mean", "d_fake_mean"}
    assert 0 < out["d_real_mean"] < 1 and 0 < out["d_fake_mean"] < 1


def test_finetune_recipe_and_mlflow_logging(tmp_path: Path, prepared_sets: Path,
                                            mlflow_store: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Real SQLite store: every loss, D(x), D(G(z)), lr, PSNR and SR images are logged; G
    starts from models/srresnet.pt; Adam's beta1 and the midpoint lr drop come from params."""
    from mlflow.tracking import MlflowClient

    from srcore.tracking import stage_run

    raw = _params(finetune={"iterations": 6, "log_every": 1, "val_every": 3,
                            "checkpoint_every": 4, "lr": 2e-12, "lr_second_half": 1e-12,
                            "beta1": 0.5})
    params, layout = _project(tmp_path, prepared_sets, raw)
    monkeypatch.chdir(tmp_path)  # MLflow artifacts land under tmp_path
    _save_srresnet(layout, raw)
    start = checkpoints.load_generator_file(layout.model("srresnet"))
    with stage_run(params.tracking.experiment, "finetune") as tracker:
        model, metrics = finetune.train(params, layout, tracker)
        run_id = tracker.run_id
    client = MlflowClient()
    logged = client.get_run(run_id).data.metrics
    for key in ("loss_g", "loss_g_content", "loss_g_adv", "loss_d_real", "loss_d_fake",
                "d_real_mean", "d_fake_mean", "val_psnr_y", "lr"):
        assert f"finetune/{key}" in logged, key
    lrs = {m.step: m.value for m in client.get_metric_history(run_id, "finetune/lr")}
    assert lrs == pytest.approx({1: 2e-12, 2: 2e-12, 3: 2e-12, 4: 1e-12, 5: 1e-12, 6: 1e-12})
    psnr = {m.step: m.value for m in client.get_metric_history(run_id, "finetune/val_psnr_y")}
    assert sorted(psnr) == [3, 6] and metrics["val_psnr_y"] == pytest.approx(psnr[6])
    # The paper's trade over iterations: NIQE beside PSNR at every validation step.
    niqe = {m.step: m.value for m in client.get_metric_history(run_id, "finetune/val_niqe")}
    assert sorted(niqe) == [3, 6] and metrics["val_niqe"] == pytest.approx(niqe[6])
    images = sorted(f.path for f in client.list_artifacts(run_id, "val/finetune"))
    assert images == ["val/finetune/0000003_img00.png", "val/finetune/0000006_img00.png"]
    # G started from the SRResNet (lr ~ 0 keeps the weights), not from a fresh init
    for (name, p0), p1 in zip(start.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p1, p0, rtol=0, atol=1e-8, msg=name)
    ckpt = torch.load(layout.checkpoints / "finetune.pt", weights_only=True)
    for opt in ("optim.generator", "optim.discriminator"):
        assert ckpt[opt]["param_groups"][0]["betas"] == (0.5, raw["finetune"]["beta2"])
    assert dict(ckpt["sched.generator"]["milestones"]) == {3: 1}


def test_ema_averages_weights_and_buffers() -> None:
    params = config.parse(_params(pretrain={"ema_decay": 0.75}))
    g = SRResNet(1, 4)
    ema = loop.make_ema(params.pretrain.ema_decay, g)
    assert ema is not None and loop.make_ema(None, g) is None
    assert config.parse(_params()).pretrain.ema_decay is None  # pretraining keeps its weights
    before = {k: v.clone() for k, v in g.state_dict().items()}
    ema.update_parameters(g)  # the first update copies
    with torch.no_grad():
        for p in g.parameters():
            p.add_(1.0)
        g.body_tail[1].running_mean.add_(4.0)
    ema.update_parameters(g)
    torch.testing.assert_close(ema.module.tail.weight, before["tail.weight"] + 0.25)
    torch.testing.assert_close(ema.module.body_tail[1].running_mean,
                               before["body_tail.1.running_mean"] + 1.0)


# --------------------------------------------------------------------------- memory


def _live_tensors() -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _memory_growth(tmp_path: Path, prepared: Path) -> tuple[int, float]:
    """(live tensors, RSS MiB) gained between iteration 50 and 300 of a tiny pretrain."""
    raw = _params(pretrain={"iterations": 300, "log_every": 10, "val_every": 300,
                            "checkpoint_every": 100})
    params, layout = _project(tmp_path, prepared, raw)
    proc = psutil.Process()
    samples: dict[int, tuple[int, float]] = {}

    def sample(step: int | None) -> None:
        if step in (50, 300) and step not in samples:
            gc.collect()
            samples[step] = (_live_tensors(), proc.memory_info().rss / 2**20)

    pretrain.train(params, layout, FakeTracker(on_log=sample))
    return samples[300][0] - samples[50][0], samples[300][1] - samples[50][1]


def test_memory_stays_flat_over_hundreds_of_steps(tmp_path: Path, prepared_sets: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    tensors, rss = _memory_growth(tmp_path / "ok", prepared_sets)
    assert tensors <= 2 and rss < 16, (tensors, rss)
    # the check can fail: a loop that keeps each iteration's batch is caught
    kept: list[torch.Tensor] = []
    real = steps.make_pretrain_step

    def leaky(*args: Any, **kwargs: Any) -> steps.StepFn:
        step = real(*args, **kwargs)

        def wrapped(lr: torch.Tensor, hr: torch.Tensor) -> dict[str, float]:
            kept.append(hr)
            return step(lr, hr)

        return wrapped

    monkeypatch.setattr(steps, "make_pretrain_step", leaky)
    tensors, _ = _memory_growth(tmp_path / "leaky", prepared_sets)
    assert tensors >= 250


def test_build_generator_matches_params() -> None:
    params = config.parse(_params())
    g = build_generator(params.model, params.scale)
    assert len(g.body) == params.model.blocks and g.global_skip == params.model.global_skip


# ------------------------------------------- divergence, precision, unreadable checkpoints


def _stage_by_hand(root: Path, stage: str) -> int:
    from srcore import cli

    return cli.main(["--params", str(root / "params.yaml"), "--root", str(root), stage])


def _outputs(root: Path) -> dict[str, tuple[int, bytes]]:
    """mtime and bytes of everything under models/, metrics/ and checkpoints/."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for folder in ("models", "metrics", "checkpoints")
            for p in sorted((root / folder).rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("stage", "lr_key", "loss"), [
    ("pretrain", "pretrain.lr", "loss_mse"),
    ("finetune", "finetune.lr", "loss_g"),
])
def test_divergence_stops_at_the_first_non_finite_loss_and_keeps_the_good_outputs(
        tmp_path: Path, prepared_sets: Path, mlflow_store: str, capsys,
        stage: str, lr_key: str, loss: str) -> None:
    """The issue's reproduction (tiny config, lr 1000): exit 2 with the step, the value and
    the knob; models/, metrics/ and checkpoints/ as the last good run left them; nothing
    registered, no non-finite number logged, the MLflow run marked failed."""
    import json

    from mlflow.tracking import MlflowClient

    # checkpoint_every beyond the run: a good step-2 checkpoint (divergence at step 3 on
    # another CPU) would be legitimate, and is tested below
    raw = _params(**{stage: {"lr": 1000.0, "iterations": 6, "checkpoint_every": 100}})
    raw["tracking"]["register_models"] = True
    _, layout = _project(tmp_path, prepared_sets, raw)
    _save_srresnet(layout, raw)  # the previous good outputs
    for name in ("pretrain", "finetune"):
        (layout.metrics / f"{name}.json").parent.mkdir(parents=True, exist_ok=True)
        (layout.metrics / f"{name}.json").write_text('{"val_psnr_y": 30.0}\n')
    before = _outputs(tmp_path)
    capsys.readouterr()

    assert _stage_by_hand(tmp_path, stage) == 2
    err = capsys.readouterr().err
    lines = re.findall(rf"srgan {stage}: error: [^\r\n]*", err)  # after a progress bar's \r
    assert len(lines) == 1 and "Traceback" not in err, err
    found = re.search(rf"{stage} diverged at step (\d+): {loss} is (nan|inf)", lines[0])
    assert found, lines[0]
    assert f"lower {lr_key} (now 1000)" in lines[0]
    assert _outputs(tmp_path) == before  # not even rewritten; no checkpoint of the diverged state
    for name in ("pretrain", "finetune"):
        json.loads((layout.metrics / f"{name}.json").read_text())  # strict JSON
    client = MlflowClient()
    assert client.search_registered_models() == []
    (run,) = client.search_runs([client.get_experiment_by_name("srgan-pipeline").experiment_id])
    assert run.info.status == "FAILED"
    assert all(math.isfinite(v) for v in run.data.metrics.values())
    steps_logged = {m.step for m in client.get_metric_history(run.info.run_id,
                                                              f"{stage}/{loss}")}
    assert all(s < int(found.group(1)) for s in steps_logged)


def test_non_finite_weights_stop_training_at_the_next_check_without_a_checkpoint(
        tmp_path: Path, prepared_sets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight can go non-finite while the loss that step was still finite: the weights are
    checked at every log, validation and checkpoint point, before anything is saved."""
    from srcore.training.guard import Diverged

    raw = _params(pretrain={"iterations": 8, "log_every": 4, "val_every": 8,
                            "checkpoint_every": 2})
    params, layout = _project(tmp_path, prepared_sets, raw)
    real = steps.make_pretrain_step

    def poisoning(generator: nn.Module, *args: Any, **kwargs: Any) -> steps.StepFn:
        step, count = real(generator, *args, **kwargs), [0]

        def wrapped(lr: torch.Tensor, hr: torch.Tensor) -> dict[str, float]:
            out = step(lr, hr)
            count[0] += 1
            if count[0] == 3:  # a BN statistic: training-mode losses stay finite
                with torch.no_grad():
                    runtime.unwrap(generator).body_tail[1].running_mean[0] = float("nan")
            return out

        return wrapped

    monkeypatch.setattr(steps, "make_pretrain_step", poisoning)
    tracker = FakeTracker()
    with pytest.raises(Diverged, match=r"pretrain diverged at step 4: weight "
                                       r"'generator\.body_tail\.1\.running_mean' is not finite"):
        pretrain.train(params, layout, tracker)
    assert torch.load(layout.checkpoint("pretrain"), weights_only=True)["iteration"] == 2
    assert tracker.metrics == {}  # found before the first log (step 4): nothing logged
    assert not layout.model("srresnet").exists()


def test_precision_is_said_once_logged_tagged_and_checkpointed(
        tmp_path: Path, prepared_sets: Path, mlflow_store: str, capsys) -> None:
    from mlflow.tracking import MlflowClient

    raw = _params(pretrain={"iterations": 4})
    raw["runtime"]["precision"] = "fp32"
    raw["tracking"]["register_models"] = True
    _, layout = _project(tmp_path, prepared_sets, raw)
    assert _stage_by_hand(tmp_path, "pretrain") == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "precision" in line]
    assert said == ["pretrain: precision fp32 (fp32: asked for; bit-exact across machines)"]
    client = MlflowClient()
    version = client.get_model_version("srresnet", "1")
    assert version.tags["precision"] == "fp32 (fp32: asked for; bit-exact across machines)"
    params = client.get_run(version.run_id).data.params
    assert params["runtime.precision_used"] == version.tags["precision"]
    # Few tags: the model shape is in the params JSON tag and in the pickled network.
    assert not {"blocks", "channels", "global_skip", "scale", "mlflow_run_id"} & set(version.tags)
    saved = torch.load(layout.model("srresnet"), weights_only=True)
    assert saved["precision"] == version.tags["precision"]


def test_resume_on_a_machine_resolving_another_precision_starts_over(
        tmp_path: Path, prepared_sets: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """runtime.precision: auto is bf16 on a CPU with native bf16 and fp32 elsewhere: a
    checkpoint moved between the two is not resumed (one run never mixes them), and says so."""
    from srcore import precision

    raw = _params(pretrain={"iterations": 6, "checkpoint_every": 2})
    raw["runtime"]["precision"] = "auto"
    params, layout = _project(tmp_path, prepared_sets, raw)

    def interrupted(native: bool) -> None:
        with monkeypatch.context() as m:
            m.setattr(precision, "cpu_has_native_bf16", lambda: native)
            _interrupt_after(m, "make_pretrain_step", 3)
            with pytest.raises(KeyboardInterrupt):
                pretrain.train(params, layout, FakeTracker())

    def finished(native: bool) -> FakeTracker:
        tracker = FakeTracker()
        with monkeypatch.context() as m:
            m.setattr(precision, "cpu_has_native_bf16", lambda: native)
            pretrain.train(params, layout, tracker)
        return tracker

    interrupted(native=True)
    assert torch.load(layout.checkpoint("pretrain"), weights_only=True)["precision"] == "bf16"
    capsys.readouterr()
    tracker = finished(native=False)
    err = capsys.readouterr().err
    assert "it was trained in bf16, but runtime.precision resolves to fp32 on this machine; " \
           "starting over" in err
    assert "pretrain/resumed_at" not in tracker.metrics
    # that run left its own (fp32) checkpoint at 4: the same precision resumes as before
    assert finished(native=False).metrics["pretrain/resumed_at"] == {4: 4.0}


def test_runtime_precision_accepts_what_the_resolver_knows() -> None:
    from srcore import precision

    for setting in precision.SETTINGS:
        assert config.parse(_params(runtime={"precision": setting})).runtime.precision == setting
    with pytest.raises(config.ConfigError, match="runtime.precision"):
        config.parse(_params(runtime={"precision": "fp16"}))
    with pytest.raises(config.ConfigError, match="runtime.amp"):  # the old key is gone
        config.parse(_params(runtime={"amp": True}))


def test_an_unreadable_checkpoint_is_reported_once_in_our_words(
        tmp_path: Path, prepared_sets: Path, mlflow_store: str, capsys) -> None:
    """A checkpoint holding pickled objects: one line, no PyTorch advice to load it with
    weights_only=False; the stage starts over and finishes."""
    raw = _params()
    _, layout = _project(tmp_path, prepared_sets, raw)
    layout.checkpoint("pretrain").parent.mkdir(parents=True)
    torch.save({"fingerprint": "x", "hook": nn.ReLU()}, layout.checkpoint("pretrain"))
    capsys.readouterr()
    assert _stage_by_hand(tmp_path, "pretrain") == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "checkpoints/pretrain.pt" in line]
    assert len(said) == 1, err
    assert said[0].endswith("it holds objects other than tensors, which are never loaded; "
                            "starting over")
    assert "weights_only" not in err
    assert layout.model("srresnet").is_file() and not layout.checkpoint("pretrain").exists()


def test_training_never_reads_a_test_set(tmp_path: Path, prepared_sets: Path,
                                         mlflow_store: str) -> None:
    """Training, validation, checkpoint choice and the gate's inputs come from train and val
    only: with the prepared test split deleted, `srgan pretrain` and `srgan finetune` both
    run, and validation scored the val image."""
    from srcore import cli

    raw = _params(pretrain={"val_every": 2}, finetune={"val_every": 2})
    params, layout = _project(tmp_path, prepared_sets, raw)
    shutil.rmtree(layout.prepared / "test")
    args = ["--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path)]
    assert cli.main([*args, "pretrain"]) == 0
    assert cli.main([*args, "finetune"]) == 0
    assert not (layout.prepared / "test").exists()
    val = json.loads((layout.metrics / "finetune.json").read_text())
    assert {"val_psnr_y", "val_niqe"} <= set(val)  # the 200x104 val image: NIQE defined
