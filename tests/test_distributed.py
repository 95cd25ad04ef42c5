"""Data-parallel training: two real Gloo processes under torchrun train the model one process
would, rank 0 alone logs and writes, and resume works from rank 0's checkpoint alone.

Tolerance (also in the README), fp32 on CPU, after 4 pretrain and 4 finetune iterations: for
every tensor of G, |w_2proc - w_1proc| <= 1e-3 |w_1proc - w_start| (L2 norms: the two runs'
difference against the change training made; measured <= 5e-5). The runs differ only in float
reduction order (gradient all-reduce; BN sums per process, then across processes). Exception:
a conv bias that feeds a BatchNorm has zero gradient in exact arithmetic (BN subtracts the
batch mean), so Adam moves it by float noise alone in both runs; it is held to |diff| <= 5e-5
absolute (measured <= 7e-6; one Adam step is lr = 3e-4).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from srcore import config
from srcore.data.datasets import Pair, RandomCropBatches
from srcore.layout import Layout
from srcore.models.srresnet import build_generator
from srcore.stages import finetune, pretrain
from srcore.training import distributed
from tests.conftest import make_prepared_sets, tiny_params_dict, write_params

REPO = Path(__file__).resolve().parents[1]
REL_TO_UPDATE, NOISE_ATOL = 1e-3, 5e-5

WORKER = '''
"""One torchrun process: joins the Gloo group, runs `srgan pretrain` through cli.main as
`torchrun -m srcore.cli pretrain` does (killed, then resumed), then fine-tunes (finetune.train,
without MLflow: its stage code is pretrain's), keeping its weights so ranks can be compared."""
import os, shutil, sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from srcore import cli, config
from srcore.layout import Layout
from srcore.stages import finetune, pretrain
from srcore.training import distributed, steps

rank = int(os.environ["RANK"])
out, root = Path(sys.argv[1]), Path(sys.argv[2 + rank])  # a project copy per rank (machine)
torch.set_num_threads(1)
# kept across the three calls below; a rank stuck in a collective fails in 60 s, not 30 min
dist.init_process_group("gloo", timeout=timedelta(seconds=60))


def keep(fn, stage):
    def wrapped(*args, **kwargs):
        model, metrics = fn(*args, **kwargs)
        norm = torch.nn.modules.batchnorm._BatchNorm
        kinds = {type(m) for m in model.modules() if isinstance(m, norm)}
        assert kinds == {torch.nn.BatchNorm2d}, kinds  # saved and logged without sync BN
        torch.save(model.state_dict(), out / f"{stage}-rank{rank}.pt")
        return model, metrics
    return wrapped


def interrupting(real, after):
    def factory(*args, **kwargs):
        step, calls = real(*args, **kwargs), [0]
        def wrapped(lr, hr):
            calls[0] += 1
            if calls[0] > after:
                raise KeyboardInterrupt  # like a kill, on every rank at the same iteration
            return step(lr, hr)
        return wrapped
    return factory


pretrain.train, finetune.train = keep(pretrain.train, "pretrain"), keep(finetune.train, "finetune")
args = ["--params", str(root / "params.yaml"), "--root", str(root)]
real_step = steps.make_pretrain_step
steps.make_pretrain_step = interrupting(real_step, 3)  # last checkpoint: iteration 2
codes = [cli.main([*args, "pretrain"])]
steps.make_pretrain_step = real_step
codes.append(cli.main([*args, "pretrain"]))  # resumes from rank 0's checkpoint
if rank:  # another machine fetches the stage's output (dvc pull, a copy)
    (root / "models").mkdir(exist_ok=True)
    shutil.copyfile(Path(sys.argv[2]) / "models" / "srresnet.pt", root / "models" / "srresnet.pt")
finetune.train(config.load(root / "params.yaml"), Layout(root), distributed.NullTracker())
dist.destroy_process_group()
print(f"rank {rank} exit codes {codes}", flush=True)
sys.exit(0 if codes == [130, 0] else 1)
'''


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prepared_sets(tmp_path_factory.mktemp("ddp-prepared"))


def _raw(distributed_on: bool) -> dict[str, Any]:
    raw = tiny_params_dict(data={"train": ["tr"], "val": ["va"], "test": ["te"]})
    for stage in ("pretrain", "finetune"):
        raw[stage].update(iterations=4, batch_size=4, log_every=1, val_every=4,
                          checkpoint_every=2)
    raw["runtime"].update(precision="fp32", distributed=distributed_on)  # the stated tolerance
    return raw


def _project(root: Path, prepared: Path, raw: dict[str, Any]) -> Layout:
    shutil.copytree(prepared, root / "prepared")
    write_params(root / "params.yaml", raw)
    return Layout(root)


class _Quiet:
    run_id = "reference"

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_image(self, image: np.ndarray, name: str) -> None:
        pass


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------ slices


def test_the_slices_of_all_ranks_are_the_single_process_batch() -> None:
    rng = np.random.default_rng(0)
    pairs = []
    for i, (h, w) in enumerate(((40, 48), (32, 64), (36, 36))):
        hr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pairs.append(Pair(f"p{i}", hr, hr[::4, ::4].copy()))
    whole = RandomCropBatches(pairs, 6, 16, 4, 7, True, "image")
    for world in (2, 3):
        parts = [RandomCropBatches(pairs, 6, 16, 4, 7, True, "image", part=(r, world))
                 for r in range(world)]
        for index in (0, 5):
            lr, hr = whole[index]
            got = [p[index] for p in parts]
            assert all(g[0].shape[0] == 6 // world for g in got)
            assert torch.equal(torch.cat([g[0] for g in got]), lr)
            assert torch.equal(torch.cat([g[1] for g in got]), hr)
            assert not torch.equal(got[0][1], got[1][1])  # ranks train on different crops
    with pytest.raises(ValueError, match="does not split into 4"):
        RandomCropBatches(pairs, 6, 16, 4, 7, True, part=(0, 4))


def test_a_batch_that_does_not_split_and_torchrun_without_the_switch_are_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(config.ConfigError,
                       match=r"'pretrain.batch_size' is 6.*4 processes.*multiple of 4"):
        distributed.split_batch("pretrain.batch_size", 6, distributed.World(0, 4))
    assert distributed.split_batch("finetune.batch_size", 16, distributed.World(1, 4)) == 4
    off = config.parse(tiny_params_dict()).runtime
    assert not off.distributed  # params.yaml as checked in: one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(config.ConfigError, match="'runtime.distributed' is false"), \
            distributed.session(off):
        pass
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: fine either way
    with distributed.session(off) as world:
        assert world == distributed.World()


# -------------------------------------------------------------------- two Gloo processes


def _torchrun(tmp_path: Path, roots: list[Path], env: dict[str, str]) -> float:
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(WORKER))
    out = tmp_path / "out"
    out.mkdir()
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
         "--nproc_per_node", "2", str(worker), str(out), *map(str, roots)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return time.perf_counter() - t0


def _bias_before_bn(model: torch.nn.Module) -> set[str]:
    """State-dict keys of conv biases directly followed by a BatchNorm (zero true gradient)."""
    keys = set()
    for prefix, module in model.named_modules():
        if isinstance(module, torch.nn.Sequential):
            layers = list(module)
            for i in range(len(layers) - 1):
                if isinstance(layers[i], torch.nn.Conv2d) \
                        and isinstance(layers[i + 1], torch.nn.BatchNorm2d):
                    keys.add(f"{prefix}.{i}.bias".lstrip("."))
    return keys


def _assert_same_training(got: dict[str, torch.Tensor], want: torch.nn.Module,
                          start: dict[str, torch.Tensor]) -> None:
    noise_only = _bias_before_bn(want)
    assert len(noise_only) == 3  # blocks=1: two in the residual block, one in body_tail
    reference = want.state_dict()
    assert got.keys() == reference.keys()
    for key, w in reference.items():
        diff = (got[key].double() - w.double()).norm().item()
        update = (w.double() - start[key].double()).norm().item()
        if key in noise_only:
            assert (got[key] - w).abs().max().item() <= NOISE_ATOL, key
        else:
            assert diff <= REL_TO_UPDATE * update, f"{key}: {diff:.3g} vs update {update:.3g}"
    moved = min((reference[k].double() - start[k].double()).norm().item()
                for k in reference if "weight" in k)
    assert moved > 0  # every weight was trained, so the bound above has teeth


def test_two_gloo_processes_train_what_one_process_trains(
        tmp_path: Path, prepared: Path, mlflow_template: Path) -> None:
    ddp_raw = _raw(distributed_on=True)
    main, other = tmp_path / "rank0", tmp_path / "rank1"  # two "machines": no shared disk
    _project(main, prepared, ddp_raw)
    _project(other, prepared, ddp_raw)
    inputs_of_other = _files(other)
    shutil.copyfile(mlflow_template, main / "mlflow.db")
    uri = f"sqlite:///{main / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "SRGAN_PARENT_RUN_ID"}
    env.update(MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    seconds = _torchrun(tmp_path, [main, other], env)
    print(f"torchrun, 2 processes, interrupted + resumed pretrain and finetune: {seconds:.1f} s")

    out = tmp_path / "out"
    ranks = {stage: [torch.load(out / f"{stage}-rank{r}.pt", weights_only=True)
                     for r in (0, 1)] for stage in ("pretrain", "finetune")}
    for stage, (r0, r1) in ranks.items():
        for key in r0:
            assert torch.equal(r0[key], r1[key]), f"{stage}: ranks differ at {key}"
    saved = torch.load(main / "models" / "srresnet.pt", weights_only=True)["state_dict"]
    for key, value in ranks["pretrain"][0].items():
        assert torch.equal(saved[key], value), key

    # one process, the same global batches; finetune starts from the same srresnet.pt
    params = config.parse(_raw(distributed_on=False))
    ref = _project(tmp_path / "single", prepared, _raw(distributed_on=False))
    torch.manual_seed(params.seed)
    start = build_generator(params.model, params.scale).state_dict()
    want, _ = pretrain.train(params, ref, _Quiet())
    _assert_same_training(ranks["pretrain"][0], want, start)
    ref.models.mkdir()
    shutil.copyfile(main / "models" / "srresnet.pt", ref.model("srresnet"))
    want_ft, _ = finetune.train(params, ref, _Quiet())
    _assert_same_training(ranks["finetune"][0], want_ft, saved)

    # rank 0 alone talks to MLflow and writes; rank 1's disk holds only what it was given
    assert _files(other) == inputs_of_other | {"models/srresnet.pt"}
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("srgan-pipeline").experiment_id])
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert len(runs) == 1 and set(by_stage) == {"pretrain"}  # killed, then resumed
    pre = by_stage["pretrain"]
    assert pre.info.status == "FINISHED" and pre.data.metrics["pretrain/resumed_at"] == 2
    assert {k: pre.data.params[k] for k in pre.data.params if k.startswith("distributed.")} == {
        "distributed.world_size": "2", "distributed.backend": "gloo",
        "distributed.global_batch_size": "4", "distributed.batch_size_per_process": "2"}
    steps = {m.step for m in client.get_metric_history(pre.info.run_id, "pretrain/loss_mse")}
    assert steps == {1, 2, 3, 4}
    assert len(client.search_model_versions("name = 'srresnet'")) == 1
    # models/srresnet.pt finds its registered version by content (no version number in it)
    files = [v.tags.get("file_sha256") for v in client.search_model_versions("name='srresnet'")]
    assert files == [hashlib.sha256((main / "models" / "srresnet.pt").read_bytes()).hexdigest()]
    assert not (main / "checkpoints" / "pretrain.pt").exists()
